"""Row routing of a mixed-adapter batch: which adapter each row uses, and the row-group arithmetic.

The layers read a :class:`RowRouting` while :func:`adapters.mixed_batch.routed` holds one on them;
the helpers take, add into and reassemble row groups (dimension 0). Kept apart from
:mod:`adapters.mixed_batch` because every adapter layer needs these, while only the model needs
the context that installs a routing on its layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

BASE_ADAPTER = "__base__"

# A row group is every row (None), a contiguous run of rows (a slice: views, no gather or scatter),
# or row indices. Stacking each adapter's rows together (``["a"] * n + ["b"] * n``), or one row per
# adapter, gives slices; interleaved names give index tensors.


class RowRouting:
    """Which adapter each batch row uses; row groups are computed once per (row count, device)."""

    def __init__(self, adapter_names: Sequence[str]) -> None:
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError(f"adapter_names must be a list of adapter names (one per row), got {adapter_names!r}")
        if len(adapter_names) == 0:
            raise ValueError("adapter_names must name one adapter per batch row, got an empty list")
        self.adapter_names = list(adapter_names)
        self._groups: dict[tuple[int, torch.device], list[tuple[str, torch.Tensor | slice | None]]] = {}

    def groups(self, rows: int, device: torch.device) -> list[tuple[str, torch.Tensor | slice | None]]:
        """``[(adapter name, rows), ...]`` in first-appearance order; rows: ``None`` for all rows,
        a ``slice`` for a contiguous run, else an index tensor."""
        key = (rows, device)
        cached = self._groups.get(key)
        if cached is not None:
            return cached
        n = len(self.adapter_names)
        if rows % n:
            raise ValueError(
                f"adapter_names has {n} entries but a layer saw {rows} rows (expected a multiple of {n})"
            )
        repeat = rows // n
        members: dict[str, list[int]] = {}
        for i, name in enumerate(self.adapter_names):
            members.setdefault(name, []).extend(range(i * repeat, (i + 1) * repeat))
        if len(members) == 1:
            groups: list[tuple[str, torch.Tensor | slice | None]] = [(self.adapter_names[0], None)]
        else:
            groups = [(name, _row_group(idx, device)) for name, idx in members.items()]
        self._groups[key] = groups
        return groups


def _row_group(idx: list[int], device: torch.device) -> torch.Tensor | slice:
    if idx == list(range(idx[0], idx[0] + len(idx))):
        return slice(idx[0], idx[0] + len(idx))
    return torch.tensor(idx, dtype=torch.long, device=device)


def take_rows(x: torch.Tensor, rows: torch.Tensor | slice | None) -> torch.Tensor:
    """``x`` restricted to ``rows`` (dimension 0; a view for a slice); ``None`` means every row."""
    if rows is None:
        return x
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def add_rows(result: torch.Tensor, rows: torch.Tensor | slice | None, delta: torch.Tensor) -> torch.Tensor:
    """``result`` with ``delta`` added to ``rows``: in place without grad, out of place with it."""
    delta = delta.to(result.dtype)
    in_place = not torch.is_grad_enabled()
    if rows is None:
        return result.add_(delta) if in_place else result + delta
    if isinstance(rows, slice):
        if in_place:
            result[rows].add_(delta)
            return result
        return result.slice_scatter(result[rows] + delta, 0, rows.start, rows.stop)
    return result.index_add_(0, rows, delta) if in_place else result.index_add(0, rows, delta)


def gather_groups(outputs: list[tuple[torch.Tensor | slice | None, torch.Tensor]]) -> torch.Tensor:
    """Reassemble per-group outputs ``[(rows, y), ...]`` (a partition of the batch) in row order."""
    if len(outputs) == 1 and outputs[0][0] is None:
        return outputs[0][1]
    if all(isinstance(rows, slice) for rows, _ in outputs):  # runs: in order of their starts
        return torch.cat([y for _, y in sorted(outputs, key=lambda o: o[0].start)])  # type: ignore[union-attr]
    device = outputs[0][1].device
    order = torch.cat([torch.arange(rows.start, rows.stop, device=device) if isinstance(rows, slice) else rows
                       for rows, _ in outputs])  # type: ignore[misc]
    stacked = torch.cat([y for _, y in outputs])
    return stacked.index_select(0, torch.argsort(order))
