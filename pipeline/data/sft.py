"""Supervised fine-tuning rows as token ids: prompt masked, response learned."""

from __future__ import annotations

from typing import Any

from datasets import Dataset

from raypeft.pipeline.data.errors import DataError
from raypeft.pipeline.data.tokenizing import (IGNORE_INDEX, Truncation, TruncationReport, check_length, eos_ids, fit,
                                              format_prompts, map_rows, require_columns, specials_of, texts_of,
                                              token_ids, too_long)


def tokenize_sft(
    ds: Dataset,
    tokenizer: Any,
    *,
    prompt_column: str,
    response_column: str,
    prompt_template: str = "{prompt}",
    max_length: int,
    is_seq2seq: bool = False,
    add_eos: bool = True,
    truncation: Truncation = "left-prompt",
) -> tuple[Dataset, TruncationReport]:
    """Token ids for supervised fine-tuning: ``input_ids`` and ``labels`` (no padding).

    Causal LM: ``input_ids = [bos?] + prompt + response + [eos]`` with the prompt being
    ``prompt_template.format(prompt=row[prompt_column])``; ``labels`` are the same ids with
    every prompt token (bos included) set to -100, so the loss is on the response only.
    Prompt and response are tokenized separately (the response exactly as written, leading
    space included). Special tokens the tokenizer would append after a sequence are not put
    between prompt and response.

    Seq2seq: ``input_ids`` = the tokenized prompt with the tokenizer's special tokens,
    ``labels`` = response + eos; each is cut to ``max_length``.

    Too long rows: ``"left-prompt"`` drops tokens from the start of the prompt body (bos kept)
    so the response survives; a response longer than ``max_length - 1`` (less specials) loses
    its end (and its eos). ``"error"`` raises :class:`DataError` naming the first such row.
    """
    if truncation not in ("left-prompt", "error"):
        raise DataError(f"data.truncation: unknown mode '{truncation}'; expected left-prompt or error")
    specials = specials_of(tokenizer)
    check_length(max_length, specials)
    eos = eos_ids(tokenizer, add_eos)
    prefix = specials.prefix
    suffix = specials.suffix if is_seq2seq else []
    truncated = [0, 0]  # rows cut, rows whose response was cut too

    def fn(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        prompts = format_prompts(prompt_template, texts_of(batch[prompt_column], prompt_column, indices[0]),
                                  prompt_column)
        bodies = token_ids(tokenizer, prompts)
        responses = token_ids(tokenizer, texts_of(batch[response_column], response_column, indices[0]))
        out_ids, out_labels = [], []
        for idx, body, resp in zip(indices, bodies, responses):
            resp = resp + eos
            if is_seq2seq:
                p_len = len(prefix) + len(body) + len(suffix)
                if p_len > max_length or len(resp) > max_length:
                    if truncation == "error":
                        what = "prompt" if p_len > max_length else "response"
                        n = p_len if p_len > max_length else len(resp)
                        raise DataError(f"data.max_length: row {idx} {what} has {n} tokens, more than "
                                        f"max_length={max_length}; set data.truncation: left-prompt or raise "
                                        "data.max_length")
                    truncated[0] += 1
                    truncated[1] += len(resp) > max_length
                    keep = max_length - len(prefix) - len(suffix)
                    body = body[len(body) - keep:] if len(body) > keep else body
                    resp = resp[:max_length]
                out_ids.append(prefix + body + suffix)
                out_labels.append(resp)
                continue
            if len(prefix) + len(body) + len(resp) > max_length:
                if truncation == "error":
                    raise too_long(idx, len(prefix) + len(body), len(resp), max_length)
                truncated[0] += 1
                before = len(resp)
                body, (resp,), _ = fit(prefix, body, [], [resp], max_length)
                truncated[1] += len(resp) < before
            prompt_ids = prefix + body
            out_ids.append(prompt_ids + resp)
            out_labels.append([IGNORE_INDEX] * len(prompt_ids) + resp)
        return {"input_ids": out_ids, "labels": out_labels}

    require_columns(ds, [prompt_column, response_column])
    out = map_rows(ds, fn, tokenizer, "tokenize sft", prompt_column, response_column, prompt_template, max_length,
               is_seq2seq, add_eos, truncation)
    return out, TruncationReport(rows=len(ds), truncated=truncated[0], responses_cut=truncated[1])
