"""Reward functions that ship with raypeft, named in the YAML by their bare name (``rouge_l``).

Each follows the contract of any reward function (see the package docstring): keyword lists in,
one float or None per completion out. Options are keyword arguments with defaults, set from the
YAML's ``kwargs`` (e.g. ``reference_column: summary``).
"""

from __future__ import annotations

import re
import string
from typing import Any, Callable, Sequence

from raypeft.pipeline.evaluation import rouge_scores


def _references(reference_column: str, columns: dict[str, Any], n: int) -> Sequence[Any]:
    if reference_column not in columns:
        have = ", ".join(sorted(columns)) or "none"
        raise KeyError(f"no column {reference_column!r} (the rows have: {have}); set kwargs.reference_column")
    refs = columns[reference_column]
    if len(refs) != n:
        raise ValueError(f"column {reference_column!r} has {len(refs)} values for {n} completions")
    return refs


def rouge_l(completions: list[str], reference_column: str = "reference", **columns: Any) -> list[float | None]:
    """ROUGE-L F-measure of each completion against the row's reference (Porter stemmer, as the
    evaluation reports); a missing reference (None) skips the completion."""
    refs = _references(reference_column, columns, len(completions))
    return [None if ref is None else rouge_scores([completion], [ref])["rougeL"]
            for completion, ref in zip(completions, refs)]


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    return " ".join(_ARTICLES.sub(" ", str(text).lower().translate(_PUNCTUATION)).split())


def exact_match(completions: list[str], reference_column: str = "reference", **columns: Any) -> list[float | None]:
    """1.0 where the normalised completion equals the normalised reference (any of them, for a
    list of references), else 0.0; a missing reference (None) skips the completion."""
    refs = _references(reference_column, columns, len(completions))
    out: list[float | None] = []
    for completion, ref in zip(completions, refs):
        if ref is None:
            out.append(None)
            continue
        candidates = [ref] if isinstance(ref, str) else list(ref)
        out.append(float(normalise_answer(completion) in {normalise_answer(c) for c in candidates}))
    return out


def format_check(completions: list[str], min_words: int = 1, max_words: int = 60, single_line: bool = True,
                 end_chars: str = ".!?", **columns: Any) -> list[float]:
    """The fraction of format checks a completion passes, so a partly well-formed one still scores:

    its word count is within ``[min_words, max_words]``; it is one line (when ``single_line``);
    it ends with one of ``end_chars`` (any ending when empty). An empty completion scores 0.
    """
    out = []
    for completion in completions:
        text = completion.strip()
        if not text:
            out.append(0.0)
            continue
        checks = [min_words <= len(text.split()) <= max_words, not end_chars or text[-1] in end_chars]
        if single_line:
            checks.append("\n" not in text)
        out.append(sum(checks) / len(checks))
    return out


BUILTIN_REWARDS: dict[str, Callable[..., Sequence[float | None]]] = {
    "rouge_l": rouge_l,
    "exact_match": exact_match,
    "format_check": format_check,
}
