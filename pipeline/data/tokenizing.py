"""What the three tokenizers (SFT rows, preference pairs, prompts) share.

Prompt and response are tokenized separately and concatenated, so BPE never merges across the
boundary and the label mask falls exactly on the prompt tokens. The helpers here find the
tokenizer's own special tokens, format prompts, cut rows that are too long, and map a dataset
in memory with a fingerprint of their own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from datasets import Dataset

from raypeft.pipeline.data.errors import DataError, first_line

IGNORE_INDEX = -100
"""Label id the loss ignores: prompt tokens and label padding."""

Truncation = Literal["left-prompt", "error"]


@dataclass(frozen=True)
class TruncationReport:
    """How many of ``rows`` were longer than ``max_length`` and were cut to fit, and in how many
    of those the response itself (not only the prompt) was cut."""

    rows: int
    truncated: int
    responses_cut: int = 0

    @property
    def fraction(self) -> float:
        return self.truncated / self.rows if self.rows else 0.0


@dataclass(frozen=True)
class Specials:
    """Tokens the tokenizer adds around one sequence (``add_special_tokens=True``)."""

    prefix: list[int]
    suffix: list[int]


def specials_of(tokenizer: Any) -> Specials:
    probe = "hello world"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return Specials(prefix=list(full[:start]), suffix=list(full[start + len(bare):]))
    return Specials(prefix=[], suffix=[])  # tokenizer rewrites the text itself: add nothing


def eos_ids(tokenizer: Any, needed: bool) -> list[int]:
    if not needed:
        return []
    if tokenizer.eos_token_id is None:
        raise DataError("model.tokenizer: the tokenizer has no eos token to end responses with")
    return [int(tokenizer.eos_token_id)]


def format_prompts(template: str, prompts: Sequence[Any], column: str) -> list[str]:
    try:
        return [template.format(prompt=p) for p in prompts]
    except (KeyError, IndexError, ValueError) as exc:
        raise DataError(f"data.prompt_template: cannot format with the '{column}' column: {first_line(exc)} "
                        "(write literal braces as '{{' and '}}')") from exc


def texts_of(values: Sequence[Any], column: str, start: int) -> list[str]:
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise DataError(f"data.columns: column '{column}' row {start + i} is {type(v).__name__}, not text")
    return list(values)


def token_ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def fit(prefix: list[int], body: list[int], suffix: list[int], responses: list[list[int]],
        max_length: int) -> tuple[list[int], list[list[int]], bool]:
    """Left-truncate the prompt body and cut responses so prefix+body+suffix+response <= max_length.

    One prompt serves every response (both sides of a preference pair), so the body is cut for
    the longest response and all sides keep the identical prompt tokens.
    """
    fixed = len(prefix) + len(suffix)
    longest = max((len(r) for r in responses), default=0)
    if fixed + len(body) + longest <= max_length:
        return body, responses, False
    room = max_length - fixed - (1 if body else 0)  # keep at least one prompt token
    responses = [r[:room] for r in responses]
    longest = max((len(r) for r in responses), default=0)
    keep = max_length - fixed - longest
    return (body[max(0, len(body) - keep):] if keep > 0 else []), responses, True


def _fingerprint(ds: Dataset, tokenizer: Any, *parts: Any) -> str:
    h = hashlib.sha256(repr((ds._fingerprint, type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""),
                             len(tokenizer), parts)).encode())
    return h.hexdigest()[:16]


def map_rows(ds: Dataset, fn: Callable[..., dict], tokenizer: Any, desc: str, *parts: Any) -> Dataset:
    # In memory with our own fingerprint: no hashing of the tokenizer, and no cache files that
    # several Ray workers on one node would race to write.
    return ds.map(fn, batched=True, with_indices=True, remove_columns=ds.column_names, keep_in_memory=True,
                  load_from_cache_file=False, new_fingerprint=_fingerprint(ds, tokenizer, desc, *parts), desc=desc)


def check_length(max_length: int, specials: Specials) -> None:
    if max_length < len(specials.prefix) + len(specials.suffix) + 2:
        raise DataError(f"data.max_length: {max_length} leaves no room for a prompt and a response")


def too_long(index: int, prompt: int, response: int, max_length: int, what: str = "response") -> DataError:
    return DataError(f"data.max_length: row {index} has {prompt + response} tokens (prompt {prompt}, {what} "
                     f"{response}), more than max_length={max_length}; set data.truncation: left-prompt "
                     "or raise data.max_length")


def require_columns(ds: Dataset, columns: list[str]) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(f"data.columns: column '{missing[0]}' not found; present: {', '.join(ds.column_names)}")
