"""Mixed-adapter batches: one forward (or ``generate``) in which each row uses its own adapter.

``model(input_ids, adapter_names=["a", "b", "__base__", "a"])`` runs row 0 and 3 through adapter
``a``, row 1 through ``b`` and row 2 through the base model alone, in one pass over the network.
That is what serving many adapters over one base needs, and what lets the PPO roles (policy,
reference = base) share a batch.

How it works: :func:`routed` hands every adapter layer one :class:`~adapters.routing.RowRouting` for the duration
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

from torch import nn

from .injection import adapter_layers, save_wrappers
from .routing import BASE_ADAPTER, RowRouting

__all__ = ["BASE_ADAPTER", "routed", "routed_modules"]


def routed_modules(root: nn.Module) -> Iterator[nn.Module]:
    """Every module of ``root`` that reads a routing (adapter layers and modules_to_save wrappers)."""
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
