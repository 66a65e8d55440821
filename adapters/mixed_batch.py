"""Mixed-adapter batches: one forward (or ``generate``) in which each row uses its own adapter.

``model(input_ids, adapter_names=["a", "b", "__base__", "a"])`` runs row 0 and 3 through adapter
``a``, row 1 through ``b`` and row 2 through the base model alone, in one pass over the network.
That is what serving many adapters over one base needs, and what lets the PPO roles (policy,
reference = base) share a batch.

How it works: :func:`routed` hands every adapter layer one :class:`RowRouting` for the duration
of the call. A layer splits the rows it sees into groups by adapter name and runs each group
through its own adapter only:

* LoRA (and DoRA) on Linear/Conv1D: the base GEMM once over the whole batch, then one low-rank
  product per adapter group added into that group's rows (``index_add``);
* every other layer (IA3, LoHa, LoKr, AdaLoRA, bottleneck, LoRA on Embedding, modules_to_save
  copies): the layer's own forward on each group's rows with only that group's adapter on. The
  groups partition the rows, so the base work is still done once per row;
* LLaMA-Adapter: the attention once over the batch, the gated prompt attention per group.

A layer sees ``k * len(adapter_names)`` rows when ``generate`` expands the batch (beam search,
``num_return_sequences``) or a model flattens ``(batch, seq)`` before a Linear: row ``i`` of the
names then covers rows ``i*k .. i*k+k-1``, which is how both expansions lay rows out. A name a
layer does not hold (e.g. an adapter that targets other modules) leaves those rows on the base
there. Gradients flow to each row's adapter (out-of-place ops while grad is enabled).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

BASE_ADAPTER = "__base__"


class RowRouting:
    """Which adapter each batch row uses; row groups are computed once per (row count, device)."""

    def __init__(self, adapter_names: Sequence[str]) -> None:
        if isinstance(adapter_names, str) or not all(isinstance(n, str) for n in adapter_names):
            raise TypeError(f"adapter_names must be a list of adapter names (one per row), got {adapter_names!r}")
        if len(adapter_names) == 0:
            raise ValueError("adapter_names must name one adapter per batch row, got an empty list")
        self.adapter_names = list(adapter_names)
        self._groups: dict[tuple[int, torch.device], list[tuple[str, torch.Tensor | None]]] = {}

    def groups(self, rows: int, device: torch.device) -> list[tuple[str, torch.Tensor | None]]:
        """``[(adapter name, row indices), ...]`` in first-appearance order; ``None`` indices: all rows."""
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
            groups: list[tuple[str, torch.Tensor | None]] = [(self.adapter_names[0], None)]
        else:
            groups = [(name, torch.tensor(idx, dtype=torch.long, device=device)) for name, idx in members.items()]
        self._groups[key] = groups
        return groups


def take_rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``x`` restricted to ``rows`` (dimension 0); ``None`` means every row."""
    return x if rows is None else x.index_select(0, rows)


def add_rows(result: torch.Tensor, rows: torch.Tensor | None, delta: torch.Tensor) -> torch.Tensor:
    """``result`` with ``delta`` added to ``rows``: in place without grad, out of place with it."""
    delta = delta.to(result.dtype)
    in_place = not torch.is_grad_enabled()
    if rows is None:
        return result.add_(delta) if in_place else result + delta
    return result.index_add_(0, rows, delta) if in_place else result.index_add(0, rows, delta)


def gather_groups(outputs: list[tuple[torch.Tensor | None, torch.Tensor]]) -> torch.Tensor:
    """Reassemble per-group outputs ``[(rows, y), ...]`` (a partition of the batch) in row order."""
    if len(outputs) == 1 and outputs[0][0] is None:
        return outputs[0][1]
    order = torch.cat([rows for rows, _ in outputs])  # type: ignore[misc]
    stacked = torch.cat([y for _, y in outputs])
    return stacked.index_select(0, torch.argsort(order))


def routed_modules(root: nn.Module) -> Iterator[nn.Module]:
    """Every module of ``root`` that reads a routing (adapter layers and modules_to_save wrappers)."""
    from .injection import adapter_layers, save_wrappers

    for _, layer in adapter_layers(root):
        yield layer
    for _, wrapper in save_wrappers(root):
        yield wrapper


@contextlib.contextmanager
def routed(root: nn.Module, adapter_names: Sequence[str]) -> Iterator[RowRouting]:
    """Inside the block every adapter layer of ``root`` routes rows by ``adapter_names``."""
    routing = RowRouting(adapter_names)
    modules = list(routed_modules(root))
    for module in modules:
        if getattr(module, "_routing", None) is not None:
            raise RuntimeError("a mixed-adapter batch is already running on this model (nested adapter_names calls)")
    for module in modules:
        module._routing = routing
    try:
        yield routing
    finally:
        for module in modules:
            module._routing = None
