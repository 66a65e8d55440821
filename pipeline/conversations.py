"""The ``data`` block's conversation settings applied: which template, which columns.

``data.format: chat`` makes every stage read message lists; this module turns the YAML's
``chat_template`` (inline Jinja, a file, or null for the tokenizer's own) into a
:class:`~raypeft.pipeline.data.chat.ChatTokenizer`, and says whether SFT rows come as a
``messages`` column or as prompt/response message lists. The same calls run on the driver
(preflight) and in the workers, so both read rows the same way.
"""

from __future__ import annotations

from typing import Any

from datasets import Dataset

from raypeft.pipeline.config import RunConfig
from raypeft.pipeline.data.chat import ChatTokenizer, read_template


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
