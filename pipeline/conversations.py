"""The ``data`` block's conversation settings applied: which template, which columns.

``data.format: chat`` makes every stage read message lists; this module turns the YAML's
``chat_template`` (inline Jinja, a file, or null for the tokenizer's own) into a
:class:`~raypeft.pipeline.data.chat.ChatTokenizer`, and says whether SFT rows come as a
``messages`` column or as prompt/response message lists; and it tokenizes the policy stages'
prompts either way. The same calls run on the driver (preflight) and in the workers, so both
read rows the same way.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset

from raypeft.pipeline.config import RunConfig
from raypeft.pipeline.data import tokenize_prompts
from raypeft.pipeline.data.chat import ChatTokenizer, read_template
from raypeft.pipeline.data.chat_rows import tokenize_chat_prompts


def is_chat(cfg: RunConfig) -> bool:
    return cfg.data.format == "chat"


def chat_tokenizer(cfg: RunConfig, tokenizer: Any, field: str = "data.columns.messages") -> ChatTokenizer:
    """The tokenizer with the run's chat template (the YAML's, else the tokenizer's own); a
    tokenizer without one and none in the YAML is a one-line error."""
    return ChatTokenizer(tokenizer, read_template(cfg.data.chat_template), field=field)


def messages_column(cfg: RunConfig, rows: Dataset) -> str | None:
    """The SFT rows' conversation column, or ``None`` when they hold prompt/response message lists
    instead (the rows have no ``columns.messages`` column)."""
    column = cfg.data.columns.messages
    return column if column in rows.column_names else None


def tokenized_prompts(cfg: RunConfig, rows: Dataset, tokenizer: Any, *, column: str, max_length: int,
                      field: str) -> Dataset:
    """Prompt ids for the policy stages (``field``: the stage's data block): the prompt template
    on a text column, or (``data.format: chat``) a column of conversations through the chat
    template's generation prompt, so generation continues as the assistant."""
    if is_chat(cfg):
        return tokenize_chat_prompts(rows, chat_tokenizer(cfg, tokenizer, f"{field}.column"), prompt_column=column,
                                     max_length=max_length, field=f"{field}.column")
    return tokenize_prompts(rows, tokenizer, prompt_column=column, prompt_template=cfg.data.prompt_template,
                            max_length=max_length)
