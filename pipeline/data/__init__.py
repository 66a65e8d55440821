"""The data layer every stage uses: load rows, check columns, tokenize, collate.

One module per step, in the order a stage uses them:

* ``sources`` and ``loading``: what the YAML names (a local file, a directory, a glob, a saved
  dataset or a Hugging Face hub id) becomes one ``datasets.Dataset``; ``check_columns`` and
  ``split_train_eval`` work on it. Every problem a user can cause is a one-line
  :class:`DataError` (``errors``) naming the config field and the path, so the CLI can report
  it before Ray starts.
* ``tokenizing`` (what the three share), ``sft``, ``pairs``, ``prompts``: fixed token-id lists
  (no padding) for SFT, preference pairs (reward model and DPO) and PPO prompts.
* ``collate``: pure torch, inside Ray Train workers: rows padded into tensors (right padding for
  training, left padding for generation); ``packing``: an SFT or preference-pair micro-batch in bins without
  padding between rows or attention across them.
* ``chat`` and ``chat_rows``: conversations (``data.format: chat``) through a chat template, with
  the loss on assistant turns only, for every stage's row format.

Nothing here imports ray, mlflow or deepspeed.
"""

from raypeft.pipeline.data.collate import PairCollator, PromptCollator, SFTCollator, count_tokens, split_pairs
from raypeft.pipeline.data.errors import DataError
from raypeft.pipeline.data.loading import check_columns, load_rows, split_train_eval
from raypeft.pipeline.data.pairs import tokenize_pairs
from raypeft.pipeline.data.prompts import tokenize_prompts
from raypeft.pipeline.data.sft import tokenize_sft
from raypeft.pipeline.data.tokenizing import IGNORE_INDEX, Truncation, TruncationReport

__all__ = [
    "IGNORE_INDEX", "DataError", "PairCollator", "PromptCollator", "SFTCollator", "Truncation", "TruncationReport",
    "check_columns", "count_tokens", "load_rows", "split_pairs", "split_train_eval", "tokenize_pairs",
    "tokenize_prompts", "tokenize_sft",
]
