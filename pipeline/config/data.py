"""Where rows come from: the ``data`` section (SFT rows, prompt template, lengths) and the
preference-pair and prompt sources the reward, DPO and PPO sections embed."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from raypeft.pipeline.config.base import StrictModel

FileFormat = Literal["json", "jsonl", "parquet", "csv"]


class Columns(StrictModel):
    prompt: str = "prompt"
    response: str = "response"
    # data.format: chat only: a column of whole conversations (lists of {role, content}); when the
    # rows have no such column, prompt and response are read as message lists instead.
    messages: str = "messages"
    # Multitask prompt tuning only: the integer column holding each row's task id.
    task_id: str | None = None


class DataSpec(StrictModel):
    """Where the examples come from and how a prompt is formatted.

    ``source: demo`` is the embedded corpus; anything else is a local file, folder or glob
    (json/jsonl/parquet/csv) or a hub dataset id. ``eval_source`` (or ``eval_split`` of a hub
    dataset, or ``eval_fraction`` of the train rows) gives the held-out split for ROUGE.
    """

    source: str = "demo"
    train_split: str = "train"
    subset: str | None = None
    file_format: Literal["json", "jsonl", "parquet", "csv"] | None = None
    eval_source: str | None = None
    eval_split: str | None = None
    eval_fraction: float | None = Field(default=None, gt=0.0, lt=1.0)
    columns: Columns = Columns()
    prompt_template: str = "{prompt}"
    max_length: int = Field(default=256, gt=8)
    truncation: Literal["left-prompt", "error"] = "left-prompt"
    max_train_rows: int | None = Field(default=None, gt=0)
    # Conversations (pipeline/data/chat.py). ``format: chat`` reads every stage's rows as message lists
    # rendered through ``chat_template`` (inline Jinja or a file; null: the tokenizer's own template);
    # ``train_on``: loss on every assistant turn (all) or on the last one (last); ``packing``: SFT, reward and
    # DPO put a micro-batch's rows (a pair's two sides each) side by side in bins of max_length tokens, no
    # attention across them.
    format: Literal["text", "chat"] = "text"
    chat_template: str | None = None
    train_on: Literal["all", "last"] = "all"
    packing: bool = False
    # Training batches' width rounded up to a multiple (padded and packed; SFT, reward, DPO): cuDNN's
    # attention on GPUs builds a plan per distinct shape, which at a new width every step costs more than
    # the padding. auto: 64 when the workers train on GPUs, none on CPU; null: none.
    pad_to_multiple_of: int | Literal["auto"] | None = "auto"

    @field_validator("pad_to_multiple_of")
    @classmethod
    def _positive_multiple(cls, v: int | str | None) -> int | str | None:
        if isinstance(v, int) and v < 1:
            raise ValueError(f"must be a positive number of tokens, 'auto' or null, got {v}")
        return v

    @field_validator("prompt_template")
    @classmethod
    def _template_has_prompt(cls, v: str) -> str:
        if "{prompt}" not in v:
            raise ValueError("must contain '{prompt}'")
        return v



class PairColumns(StrictModel):
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"


class PairDataSpec(StrictModel):
    """Preference pairs for the reward and DPO stages: ``demo`` or a file, folder, glob or hub id.

    Held-out pairs come from ``eval_source``, ``eval_split``, or ``eval_fraction`` of the train
    rows (5% when none is given). The prompt template, ``max_length`` and ``truncation`` are the
    ``data`` block's, so the pairs are formatted exactly like the SFT rows.
    """

    source: str = "demo"
    train_split: str = "train"
    subset: str | None = None
    file_format: FileFormat | None = None
    eval_source: str | None = None
    eval_split: str | None = None
    eval_fraction: float | None = Field(default=None, gt=0.0, lt=1.0)
    columns: PairColumns = PairColumns()
    max_train_rows: int | None = Field(default=None, gt=0)
    max_eval_rows: int | None = Field(default=200, gt=0)


class PromptDataSpec(StrictModel):
    """Prompts for PPO rollouts (one column), formatted with ``data.prompt_template``."""

    source: str = "demo"
    split: str = "train"
    subset: str | None = None
    file_format: FileFormat | None = None
    column: str = "prompt"
    max_rows: int | None = Field(default=None, gt=0)

