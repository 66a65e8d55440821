"""The base class of weight-space adapter wrappers (LoRA today; IA3, LoHa, ... later).

A wrapper keeps the original module as ``base_layer`` (so the state-dict keys match PEFT's) and
holds any number of named adapters in per-adapter containers (``ModuleDict``/``ParameterDict``)
whose attribute names are listed in ``adapter_layer_names``. Everything generic -- active adapter
bookkeeping, merge/unmerge tracking, deletion, freezing, serialization views -- lives here so
that a new method only writes its parameters, its forward and its delta weight.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from .routing import RowRouting, gather_groups, take_rows


class AdapterLayer(nn.Module):
    """A module wrapping ``base_layer`` with zero or more named adapters.

    Subclasses define ``adapter_layer_names`` (containers of trainable tensors keyed by adapter
    name), ``other_param_names`` (plain dicts of per-adapter hyper-parameters), ``update_layer``,
    ``forward`` and ``get_delta_weight``.
    """

    adapter_layer_names: ClassVar[tuple[str, ...]] = ()
    other_param_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters: bool = False
        # Adapters that forward must add on top of base_layer (active, present here, not merged);
        # kept precomputed so the hot path does no filtering.
        self._forward_adapters: tuple[str, ...] = ()
        # Per-row adapter choice of a mixed-adapter batch, set by ``adapters.mixed_batch.routed``
        # for the duration of one forward/generate call (None otherwise).
        self._routing: RowRouting | None = None

    # ------------------------------------------------------------------ bookkeeping
    @property
    def adapter_names(self) -> list[str]:
        """Names of the adapters this layer holds (insertion order)."""
        names: list[str] = []
        for attr in self.adapter_layer_names:
            for key in getattr(self, attr).keys():
                if key not in names:
                    names.append(key)
        return names

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def _refresh(self) -> None:
        held = set(self.adapter_names)
        self._forward_adapters = tuple(
            n for n in self.active_adapters if n in held and n not in self.merged_adapters
        )

    def set_adapter(self, adapter_names: str | Iterable[str], trainable: bool = True) -> None:
        """Make ``adapter_names`` active; only their tensors get ``requires_grad`` (if ``trainable``).

        Names not held by this layer are accepted (another layer may hold them), which is what lets
        adapters with different targets coexist in one model.
        """
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            for key, value in container.items():
                value.requires_grad_(trainable and key in names)
        self.active_adapters = names
        self._refresh()

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove every tensor and hyper-parameter of ``adapter_name`` (unmerge it first if merged)."""
        if adapter_name in self.merged_adapters:
            raise ValueError(f"unmerge adapter {adapter_name!r} before deleting it")
        for attr in self.adapter_layer_names + self.other_param_names:
            container = getattr(self, attr)
            if adapter_name in container:
                del container[adapter_name]
        self.active_adapters = [n for n in self.active_adapters if n != adapter_name]
        self._refresh()

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The tensors of ``adapter_name`` keyed relative to this layer with the name removed.

        E.g. ``{"lora_A.weight": ..., "lora_B.weight": ...}`` -- exactly the suffixes PEFT writes
        after ``<module path>.``, so serialization is a prefix join.
        """
        out: dict[str, torch.Tensor] = {}
        for attr in self.adapter_layer_names:
            container = getattr(self, attr)
            if adapter_name not in container:
                continue
            item = container[adapter_name]
            if isinstance(item, nn.Module):
                for sub, tensor in item.state_dict(keep_vars=True).items():
                    out[f"{attr}.{sub}"] = tensor
            else:
                out[attr] = item
        return out

    def saved_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """What a checkpoint holds for ``adapter_name``: :meth:`adapter_tensors` unless a method saves
        less than it trains (AdaLoRA drops the triplets its rank allocator masked, as PEFT does)."""
        return self.adapter_tensors(adapter_name)

    # ------------------------------------------------------------------ mixed-adapter batches
    def _grouped_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """A mixed batch through any wrapper: each row group runs this layer's own forward on its
        rows with only its adapter on (rows of names this layer does not hold: the base alone).

        The groups partition the rows, so the base work is still one pass over the batch. Methods
        with a cheaper split (LoRA adds per-group low-rank products to one base output) override
        their routing; see :mod:`adapters.mixed_batch`.
        """
        routing = self._routing
        assert routing is not None
        held = set(self.adapter_names)
        saved = self._forward_adapters
        outputs: list[tuple[torch.Tensor | slice | None, torch.Tensor]] = []
        self._routing = None  # the per-group calls below are plain forwards
        try:
            for name, rows in routing.groups(x.shape[0], x.device):
                self._forward_adapters = (name,) if name in held else ()
                outputs.append((rows, self.forward(take_rows(x, rows), *args, **kwargs)))
        finally:
            self._forward_adapters = saved
            self._routing = routing
        return gather_groups(outputs)

    # ------------------------------------------------------------------ merging
    def base_weight(self) -> torch.Tensor:
        """The weight that merging writes into."""
        return self.base_layer.weight  # type: ignore[return-value]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``W_merged - W`` for ``adapter_name``, in the base weight's layout."""
        raise NotImplementedError

    def merge(self, adapter_names: Iterable[str] | None = None) -> None:
        """Add the active (or given) adapters' deltas into the base weight, once each."""
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        held = set(self.adapter_names)
        weight = self.base_weight()
        for name in names:
            if name not in held or name in self.merged_adapters:
                continue
            with torch.no_grad():
                weight.add_(self.get_delta_weight(name).to(weight.dtype))
            self.merged_adapters.append(name)
        self._refresh()

    def unmerge(self) -> None:
        """Subtract every merged delta again (most recent first)."""
        weight = self.base_weight()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                weight.sub_(self.get_delta_weight(name).to(weight.dtype))
        self._refresh()

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self.active_adapters}, merged={self.merged_adapters}"


class UnmergeableAdapterLayer(AdapterLayer):
    """Base of wrappers whose update is not a weight delta (bottleneck adapters, LLaMA-Adapter).

    Their output is a non-linear function of the input, so nothing can be folded into the base
    weight: merging an adapter this layer holds raises, and there is never anything to unmerge.
    """

    def merge(self, adapter_names: Iterable[str] | None = None) -> None:
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        held = [n for n in names if n in self.adapter_names]
        if held:
            raise ValueError(
                f"{type(self).__name__} adapter {held[0]!r} cannot be merged into the base weights "
                "(its update is not a weight delta); use unload() to remove it instead"
            )

    def unmerge(self) -> None:
        """Nothing is ever merged."""

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        raise ValueError(f"{type(self).__name__} adapter {adapter_name!r} has no weight delta")
