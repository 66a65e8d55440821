"""``LoraLayer``: the state and merging every LoRA wrapper shares (rank, scaling, dropout, DoRA
magnitude per adapter), written once against an ``(out, in)`` view of the base weight.

The update is ``W x + b + scaling * B A dropout(x)`` with ``scaling = alpha / r`` (or
``alpha / sqrt(r)`` for rsLoRA). On a quantized base merging dequantizes, merges and re-quantizes
with the layer's own settings, and unmerging restores the original quantized tensor exactly (see
:mod:`adapters.quantization`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar

import torch
from torch import nn

from .. import quantization as quant
from ..layer import AdapterLayer
from ..layer_utils import adapter_factory_kwargs
from . import dora


def _matmul(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``b @ a``; half precision on CPU goes through float32 (slow and lossy there otherwise)."""
    if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16):
        return (b.float() @ a.float()).to(a.dtype)
    return b @ a


class LoraLayer(AdapterLayer):
    """Common LoRA state: rank, scaling, dropout and (DoRA) magnitude per adapter; merging.

    Subclasses work in an ``(out, in)`` view of the base weight (:meth:`_weight_oi`) so that merging
    and DoRA's norms are written once for Linear, Conv1D (stored ``(in, out)``) and Embedding
    (``(num_embeddings, dim)``, whose "output" is the embedding dimension).
    """

    other_param_names: ClassVar[tuple[str, ...]] = ("r", "scaling", "lora_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ModuleDict()  # DoRA adapters only
        # adapters whose dropout p > 0: the only ones that pay for a dropout call
        self._dropout_on: set[str] = set()
        # DoRA factors m / ||W0 + dW|| of merged DoRA adapters (what unmerging must divide out)
        self._dora_factors: dict[str, torch.Tensor] = {}
        # the original quantized weight while adapters are merged into a quantized base
        self._quant_snapshot: tuple[Any, ...] | None = None
        self._dora_forward = False
        # the one active plain-LoRA adapter when it is the only one forward adds (the fused path)
        self._single_plain: str | None = None

    # ------------------------------------------------------------------ creation
    def _factory_kwargs(self) -> dict[str, Any]:
        """Adapters live on the base weight's device, in its dtype (or a quantized base's compute dtype)."""
        return adapter_factory_kwargs(self.base_layer)

    def add_adapter(
        self, adapter_name: str, *, r: int, scaling: float, dropout: float, init: bool | str, use_dora: bool = False
    ) -> None:
        if adapter_name in self.adapter_names:
            raise ValueError(f"adapter {adapter_name!r} already exists in this layer")
        self.r[adapter_name] = r
        self.scaling[adapter_name] = scaling
        self.lora_dropout[adapter_name] = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        if dropout > 0:
            self._dropout_on.add(adapter_name)
        self._create_tensors(adapter_name, r, init)
        if use_dora:
            self._init_magnitude(adapter_name)
        if adapter_name not in self.active_adapters:
            # a new adapter is inactive until set_adapter (as in PEFT); keep it frozen meanwhile
            for tensor in self.adapter_tensors(adapter_name).values():
                tensor.requires_grad_(False)
        self._refresh()

    def _init_magnitude(self, adapter_name: str) -> None:
        """``m = ||W + s B A||`` per output, so the fresh DoRA adapter computes what LoRA would."""
        a, _ = self._lora_pair(adapter_name)
        with torch.no_grad():
            weight = self._dense_weight_oi().to(a.dtype)
            norm = dora.initial_magnitude(weight, self._lora_delta_oi(adapter_name))
        self.lora_magnitude_vector[adapter_name] = dora.Magnitude(norm.to(a.dtype))

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._dropout_on.discard(adapter_name)

    def set_scale(self, adapter_name: str, scaling: float) -> None:
        """Override the scaling of one adapter (e.g. to fade an adapter in or out)."""
        if adapter_name in self.merged_adapters:
            raise ValueError(f"cannot rescale merged adapter {adapter_name!r}; unmerge first")
        self.scaling[adapter_name] = float(scaling)

    def _refresh(self) -> None:
        super()._refresh()
        self._dora_forward = any(n in self.lora_magnitude_vector for n in self._forward_adapters)
        names = self._forward_adapters
        self._single_plain = names[0] if len(names) == 1 and not self._dora_forward else None

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        # PEFT saves the magnitude without its ".weight" suffix
        out = super().adapter_tensors(adapter_name)
        magnitude = out.pop("lora_magnitude_vector.weight", None)
        if magnitude is not None:
            out["lora_magnitude_vector"] = magnitude
        return out

    # ------------------------------------------------------------------ per-method hooks
    def _create_tensors(self, adapter_name: str, r: int, init: bool | str) -> None:
        raise NotImplementedError

    def _lora_pair(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` as ``(r, in)`` and ``(out, r)`` tensors."""
        raise NotImplementedError

    def _weight_oi(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` (in the base layer's layout) seen as ``(out, in)``; a view, so edits write through."""
        raise NotImplementedError

    # ------------------------------------------------------------------ weights
    def _dense_weight_oi(self) -> torch.Tensor:
        """The base weight as ``(out, in)``, dequantized when the base is quantized."""
        return self._weight_oi(quant.dense_weight(self.base_layer))

    def _lora_delta_oi(self, adapter_name: str) -> torch.Tensor:
        """``s B A`` in ``(out, in)`` layout."""
        a, b = self._lora_pair(adapter_name)
        return _matmul(b, a) * self.scaling[adapter_name]

    def _dora_factor(self, adapter_name: str, weight_oi: torch.Tensor) -> torch.Tensor:
        """``m / ||W + s B A||`` per output, the norm detached (DoRA section 4.3)."""
        with torch.no_grad():
            delta = self._lora_delta_oi(adapter_name)
        return dora.dora_factor(self.lora_magnitude_vector[adapter_name].weight, weight_oi, delta)

    # ------------------------------------------------------------------ merging
    def _unmerged_weight_oi(self, weight_oi: torch.Tensor) -> torch.Tensor:
        """The base weight before any merge (float32), see :func:`adapters.lora.dora.unmerged_weight`."""
        merged = [(self._lora_delta_oi(n).float(), self._dora_factors.get(n)) for n in self.merged_adapters]
        return dora.unmerged_weight(weight_oi, merged)

    def _merge_delta_oi(self, adapter_name: str, weight_oi: torch.Tensor) -> torch.Tensor:
        """What merging ``adapter_name`` adds to the ``(out, in)`` weight (float32): ``s B A`` for
        LoRA, ``(f - 1) W0 + f s B A`` for DoRA (the factor kept until the adapter is unmerged)."""
        delta = self._lora_delta_oi(adapter_name).float()
        if adapter_name not in self.lora_magnitude_vector:
            return delta
        base = self._unmerged_weight_oi(weight_oi)
        factor = self._dora_factors.get(adapter_name)
        if factor is None:  # merging: the norm is the one forward uses, of the unmerged weight
            magnitude = self.lora_magnitude_vector[adapter_name].weight.detach().float()
            factor = dora.merge_factor(magnitude, base, delta)
            self._dora_factors[adapter_name] = factor
        return dora.merge_delta(factor, base, delta)

    def merge(self, adapter_names: Iterable[str] | None = None) -> None:
        """Fold the active (or given) adapters into the base weight, once each.

        A quantized base is dequantized, merged and re-quantized with its own settings; its original
        quantized tensor is kept until :meth:`unmerge` so the base comes back bit-exact.
        """
        requested = self.active_adapters if adapter_names is None else list(adapter_names)
        held = set(self.adapter_names)
        names: list[str] = []
        for name in requested:
            if name in held and name not in self.merged_adapters and name not in names:
                names.append(name)
        if not names:
            return
        with torch.no_grad():
            if quant.is_quantized(self.base_layer):
                if self._quant_snapshot is None:
                    self._quant_snapshot = quant.snapshot_weight(self.base_layer)
                dense = quant.dense_weight(self.base_layer).float()
                for name in names:
                    dense.add_(self._merge_delta_oi(name, dense))
                    self.merged_adapters.append(name)
                quant.replace_weight(self.base_layer, dense)
            else:
                weight_oi = self._weight_oi(self.base_layer.weight)
                for name in names:
                    weight_oi.add_(self._merge_delta_oi(name, weight_oi).to(weight_oi.dtype))
                    self.merged_adapters.append(name)
        self._refresh()

    def unmerge(self) -> None:
        """Take every merged adapter out again (most recent first)."""
        if not self.merged_adapters:
            return
        with torch.no_grad():
            if self._quant_snapshot is not None:
                quant.restore_weight(self.base_layer, self._quant_snapshot)
                self._quant_snapshot = None
                self.merged_adapters.clear()
            else:
                weight_oi = self._weight_oi(self.base_layer.weight)
                while self.merged_adapters:
                    name = self.merged_adapters[-1]
                    weight_oi.sub_(self._merge_delta_oi(name, weight_oi).to(weight_oi.dtype))
                    self.merged_adapters.pop()
                    self._dora_factors.pop(name, None)
            self._dora_factors.clear()
        self._refresh()

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``s B A`` in the base weight's own layout (the LoRA part; DoRA's rescaling is in merge)."""
        return self._weight_oi(self._lora_delta_oi(adapter_name))  # the (out, in) view is its own inverse
