"""Prompts for generation (PPO rollouts, evaluation) as token ids, with their raw text."""

from __future__ import annotations

from typing import Any

from datasets import Dataset

from raypeft.pipeline.data.errors import DataError
from raypeft.pipeline.data.tokenizing import format_prompts, map_rows, require_columns, specials_of, texts_of, token_ids


def tokenize_prompts(
    ds: Dataset,
    tokenizer: Any,
    *,
    prompt_column: str,
    prompt_template: str = "{prompt}",
    max_length: int,
    is_seq2seq: bool = False,
) -> Dataset:
    """Prompt ids for generation (PPO rollouts, evaluation): ``input_ids`` and ``prompt_text``.

    ``input_ids`` is ``[bos?] + template(prompt)`` (plus the tokenizer's trailing specials for
    seq2seq), cut from the left to ``max_length`` so the instruction at the end of the template
    survives. ``prompt_text`` is the row's prompt column unchanged (no template), so a reward
    model can rebuild the exact text with :func:`tokenize_pairs`' template.
    """
    specials = specials_of(tokenizer)
    prefix = specials.prefix
    suffix = specials.suffix if is_seq2seq else []
    if max_length < len(prefix) + len(suffix) + 1:
        raise DataError(f"data.max_length: {max_length} leaves no room for a prompt")

    def fn(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        raw = texts_of(batch[prompt_column], prompt_column, indices[0])
        bodies = token_ids(tokenizer, format_prompts(prompt_template, raw, prompt_column))
        keep = max_length - len(prefix) - len(suffix)
        ids = [prefix + (b[len(b) - keep:] if len(b) > keep else b) + suffix for b in bodies]
        return {"input_ids": ids, "prompt_text": raw}

    require_columns(ds, [prompt_column])
    return map_rows(ds, fn, tokenizer, "tokenize prompts", prompt_column, prompt_template, max_length, is_seq2seq)
