"""Preference pairs (reward model, DPO) as token ids: one prompt, a chosen and a rejected side."""

from __future__ import annotations

from typing import Any

from datasets import Dataset

from raypeft.pipeline.data.errors import DataError
from raypeft.pipeline.data.tokenizing import (IGNORE_INDEX, Truncation, TruncationReport, check_length, eos_ids, fit,
                                              format_prompts, map_rows, require_columns, specials_of, texts_of,
                                              token_ids, too_long)


def tokenize_pairs(
    ds: Dataset,
    tokenizer: Any,
    *,
    prompt_column: str,
    chosen_column: str,
    rejected_column: str,
    prompt_template: str = "{prompt}",
    max_length: int,
    add_eos: bool = True,
    truncation: Truncation = "left-prompt",
) -> tuple[Dataset, TruncationReport]:
    """Token ids for preference pairs (reward model, DPO), causal LM layout.

    Gives ``chosen_input_ids``/``chosen_labels`` and ``rejected_input_ids``/``rejected_labels``,
    each built like :func:`tokenize_sft` (prompt masked with -100, eos appended). Both sides
    share one prompt; when either side is too long the prompt is cut by the same amount on both,
    so chosen and rejected always see identical prompt tokens. A row counts as truncated once.
    """
    if truncation not in ("left-prompt", "error"):
        raise DataError(f"data.truncation: unknown mode '{truncation}'; expected left-prompt or error")
    specials = specials_of(tokenizer)
    check_length(max_length, specials)
    eos = eos_ids(tokenizer, add_eos)
    prefix = specials.prefix
    truncated = [0, 0]  # pairs cut, pairs whose chosen or rejected response was cut too

    def fn(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        start = indices[0]
        prompts = format_prompts(prompt_template, texts_of(batch[prompt_column], prompt_column, start), prompt_column)
        bodies = token_ids(tokenizer, prompts)
        chosen = token_ids(tokenizer, texts_of(batch[chosen_column], chosen_column, start))
        rejected = token_ids(tokenizer, texts_of(batch[rejected_column], rejected_column, start))
        out: dict[str, list] = {"chosen_input_ids": [], "chosen_labels": [],
                                "rejected_input_ids": [], "rejected_labels": []}
        for idx, body, c, r in zip(indices, bodies, chosen, rejected):
            c, r = c + eos, r + eos
            longest = max(len(c), len(r))
            if len(prefix) + len(body) + longest > max_length:
                if truncation == "error":
                    side = "chosen" if len(c) >= len(r) else "rejected"
                    raise too_long(idx, len(prefix) + len(body), longest, max_length, side)
                truncated[0] += 1
                before = (len(c), len(r))
                body, (c, r), _ = fit(prefix, body, [], [c, r], max_length)
                truncated[1] += (len(c), len(r)) != before
            prompt_ids = prefix + body
            mask = [IGNORE_INDEX] * len(prompt_ids)
            out["chosen_input_ids"].append(prompt_ids + c)
            out["chosen_labels"].append(mask + c)
            out["rejected_input_ids"].append(prompt_ids + r)
            out["rejected_labels"].append(mask + r)
        return out

    require_columns(ds, [prompt_column, chosen_column, rejected_column])
    out = map_rows(ds, fn, tokenizer, "tokenize pairs", prompt_column, chosen_column, rejected_column, prompt_template,
               max_length, add_eos, truncation)
    return out, TruncationReport(rows=len(ds), truncated=truncated[0], responses_cut=truncated[1])
