"""Calling the reward functions on a batch of completions: checked outputs, a weighted total, metrics.

Every list given here is per *completion*, in the group-by-group layout of
``rl_math.group_advantages`` (``expand_to_completions`` repeats per-prompt columns). The total of
a completion is ``sum_f weight_f * r_f`` over the functions that scored it; a function returning
None for a completion leaves it out of that sum, and a completion no function scored is invalid
(``valid`` False, ``total`` NaN) so the stage can drop its group.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from raypeft.pipeline.rewards.loading import CALL_KEYWORDS, TOTAL, RewardFunction, one_line


class RewardFunctionError(RuntimeError):
    """A reward function failed or broke its contract, phrased as one line naming it and the row."""


def expand_to_completions(values: Mapping[str, Sequence[Any]], num_generations: int) -> dict[str, list[Any]]:
    """Repeat each per-prompt value ``num_generations`` times, group by group (``[a, b] -> [a, a, b, b]``)."""
    return {key: [v for v in column for _ in range(num_generations)] for key, column in values.items()}


@dataclass(frozen=True)
class RewardScores:
    per_function: dict[str, list[float | None]]  # the label's raw scores, None where it skipped
    total: torch.Tensor  # [N] float64 weighted sum over the functions that scored; NaN where none did
    valid: torch.Tensor  # [N] bool: at least one function scored the completion

    def metrics(self, prefix: str = "reward") -> dict[str, float]:
        """``<prefix>/<label>/mean`` and ``/std`` (population, over scored completions) and
        ``/skipped`` (fraction) per function, and the same for ``<prefix>/total``."""
        out: dict[str, float] = {}
        columns = dict(self.per_function)
        columns[TOTAL] = [float(t) if ok else None for t, ok in zip(self.total.tolist(), self.valid.tolist())]
        for label, scores in columns.items():
            scored = [s for s in scores if s is not None]
            out[f"{prefix}/{label}/skipped"] = 1.0 - len(scored) / max(len(scores), 1)
            if scored:
                mean = sum(scored) / len(scored)
                out[f"{prefix}/{label}/mean"] = mean
                out[f"{prefix}/{label}/std"] = math.sqrt(sum((s - mean) ** 2 for s in scored) / len(scored))
        return out


def _row(i: int, row_ids: Sequence[int] | None) -> str:
    return f"row {i}" if row_ids is None else f"row {row_ids[i]} (completion {i})"


def _rows(row_ids: Sequence[int] | None, n: int) -> str:
    if n == 0:
        return "no rows"
    first, last = (0, n - 1) if row_ids is None else (row_ids[0], row_ids[-1])
    return f"row {first}" if n == 1 else f"rows {first}-{last}"


def _as_list(out: Any) -> list[Any] | None:
    if isinstance(out, torch.Tensor):
        return out.tolist() if out.dim() == 1 else None
    if hasattr(out, "tolist") and getattr(out, "ndim", None) == 1:  # a numpy array
        return out.tolist()
    if isinstance(out, (list, tuple)):
        return list(out)
    return None


def _as_score(value: Any) -> float | None | str:
    """The float (or None) a value stands for, or a short description of why it is not one."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, numbers.Real):
        x = float(value)
        return x if math.isfinite(x) else f"{x} (return None to skip a completion)"
    shown = repr(value)
    return f"a {type(value).__name__} {shown[:40] + '...' if len(shown) > 40 else shown}"


def _first_failing_row(fn: RewardFunction, call: Mapping[str, Any], per_row: set[str],
                       n: int) -> tuple[int, Exception] | None:
    """Rerun a batch that raised one completion at a time to find the row to blame."""
    for i in range(n):
        try:
            fn.fn(**{k: (v[i:i + 1] if k in per_row else v) for k, v in call.items()})
        except Exception as exc:  # noqa: BLE001 - the user's function may raise anything
            return i, exc
    return None


def _call(fn: RewardFunction, available: Mapping[str, Sequence[Any]], n: int,
          row_ids: Sequence[int] | None) -> list[float | None]:
    call = fn.call_keywords(available)
    missing = sorted(fn.required - set(call))
    if missing:
        columns = ", ".join(k for k in available if k not in CALL_KEYWORDS) or "none"
        raise RewardFunctionError(f"reward function '{fn.name}' needs a column '{missing[0]}' the rows do not have "
                                  f"(columns: {columns}) at {_rows(row_ids, n)}")
    try:
        out = fn.fn(**call)
    except Exception as exc:  # noqa: BLE001 - the user's function may raise anything
        per_row = {k for k in call if k in available and k not in fn.kwargs}
        found = _first_failing_row(fn, call, per_row, n)
        if found is None:
            raise RewardFunctionError(f"reward function '{fn.name}' raised on {_rows(row_ids, n)} (no single row "
                                      f"reproduces it): {one_line(exc)}") from exc
        i, row_exc = found
        raise RewardFunctionError(f"reward function '{fn.name}' raised on {_row(i, row_ids)}: "
                                  f"{one_line(row_exc)}") from row_exc
    values = _as_list(out)
    if values is None:
        raise RewardFunctionError(f"reward function '{fn.name}' returned {type(out).__name__} for {_rows(row_ids, n)}; "
                                  f"expected a list of {n} floats (None to skip)")
    if len(values) != n:
        raise RewardFunctionError(f"reward function '{fn.name}' returned {len(values)} values for {n} completions "
                                  f"({_rows(row_ids, n)})")
    scores: list[float | None] = []
    for i, value in enumerate(values):
        score = _as_score(value)
        if isinstance(score, str):
            raise RewardFunctionError(f"reward function '{fn.name}' returned {score} for {_row(i, row_ids)}; "
                                      "expected a float or None")
        scores.append(score)
    return scores


def score_completions(functions: Sequence[RewardFunction], prompts: Sequence[str], completions: Sequence[str],
                      columns: Mapping[str, Sequence[Any]] | None = None,
                      row_ids: Sequence[int] | None = None) -> RewardScores:
    """Score ``completions [N]`` with every function; ``prompts``, each column and ``row_ids`` (the
    dataset row of each completion, for error messages) are per completion too."""
    n = len(completions)
    columns = dict(columns or {})
    lists = [("prompts", prompts), *columns.items()] + ([("row_ids", row_ids)] if row_ids is not None else [])
    for key, column in lists:
        if len(column) != n:
            raise ValueError(f"score_completions: {key} has {len(column)} values for {n} completions")
    clash = sorted(set(columns) & set(CALL_KEYWORDS))
    if clash:
        raise ValueError(f"score_completions: a column may not be named '{clash[0]}' (reward functions get it already)")
    available = {"prompts": list(prompts), "completions": list(completions), **{k: list(v) for k, v in columns.items()}}
    per_function = {fn.name: _call(fn, available, n, row_ids) for fn in functions}
    total = [0.0] * n
    valid = [False] * n
    for fn in functions:
        for i, score in enumerate(per_function[fn.name]):
            if score is not None:
                total[i] += fn.weight * score
                valid[i] = True
    return RewardScores(per_function=per_function,
                        total=torch.tensor([t if ok else math.nan for t, ok in zip(total, valid)], dtype=torch.float64),
                        valid=torch.tensor(valid, dtype=torch.bool))
