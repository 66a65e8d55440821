"""``LoraLinear``: LoRA (and DoRA) around ``nn.Linear``, bitsandbytes' quantized Linear and GPT-2's
``Conv1D`` (whose weight is stored transposed).

Three forward paths compute the same sum: the fused path (:mod:`adapters.lora.fused`) for one
plain adapter on a dense base, the general path (any number of adapters, DoRA, quantized or hooked
bases) and the mixed-batch path (the base GEMM once, each adapter group's update into its rows).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..routing import add_rows, take_rows
from . import dora
from .fused import GLOBAL_HOOKS, PLAIN_TENSORS, FusedLoraLinear, as_rows, hook_free
from .layer import LoraLayer


class LoraLinear(LoraLayer):
    """LoRA around ``nn.Linear``, bitsandbytes' quantized Linear, or ``transformers`` ``Conv1D``
    (whose weight is stored transposed)."""

    adapter_layer_names: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.is_conv1d = isinstance(base_layer, Conv1D)
        self._fused_plan = None
        if self.is_conv1d:
            # Conv1D(nf, nx): weight (nx, nf) = (in, out); nx/nf survive ZeRO-3 partitioning
            self.in_features, self.out_features = int(base_layer.nx), int(base_layer.nf)
        else:
            self.in_features, self.out_features = int(base_layer.in_features), int(base_layer.out_features)

    def _create_tensors(self, adapter_name: str, r: int, init: bool | str) -> None:
        kw = self._factory_kwargs()
        lora_a = nn.Linear(self.in_features, r, bias=False, **kw)
        lora_b = nn.Linear(r, self.out_features, bias=False, **kw)
        # init=False keeps nn.Linear's default (kaiming-uniform) init on both: a non-zero update
        if init is True:
            nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
            nn.init.zeros_(lora_b.weight)
        elif init == "gaussian":
            nn.init.normal_(lora_a.weight, std=1.0 / r)
            nn.init.zeros_(lora_b.weight)
        self.lora_A[adapter_name] = lora_a
        self.lora_B[adapter_name] = lora_b

    def _lora_pair(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_A[adapter_name].weight, self.lora_B[adapter_name].weight

    def _weight_oi(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T if self.is_conv1d else weight

    def _dora_delta(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """DoRA's addition to the base output: ``(f - 1) W x + f s B A x``."""
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        dtype = lora_a.weight.dtype
        h = x if x.dtype == dtype else x.to(dtype)
        dropped = name in self._dropout_on and self.training
        weight = self._dense_weight_oi()
        if self.merged_adapters:  # the base holds other adapters: DoRA's W is the one before merging
            weight = self._unmerged_weight_oi(weight)
        weight = weight.to(dtype)
        factor = self._dora_factor(name, weight)
        if dropped:  # the base output saw the un-dropped input; W x must use the dropped one
            h = self.lora_dropout[name](h)
        if dropped or self.merged_adapters:
            plain = F.linear(h, weight)
        else:
            bias = getattr(self.base_layer, "bias", None)
            plain = base_out if bias is None else base_out - bias.to(base_out.dtype)
        return dora.output_delta(factor, plain, lora_b(lora_a(h)) * self.scaling[name])

    def _refresh(self) -> None:
        super()._refresh()
        # what the fused path needs, looked up once per change of the active set instead of per call
        name, base = self._single_plain, self.base_layer
        fusable = type(base) is nn.Linear or (self.is_conv1d and type(base) is Conv1D)
        if name is None or not fusable or name not in self.lora_A:
            self._fused_plan: tuple[str, nn.Module, nn.Module | None] | None = None
        else:
            self._fused_plan = (name, base, self.lora_dropout[name] if name in self._dropout_on else None)

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor | None:
        """Base and the single active LoRA adapter in one step, or ``None`` when that is not exact.

        Taken when the base is a plain ``nn.Linear``/``Conv1D`` with dense weights, no module
        hooks are registered (ZeRO-3 and friends gather weights in hooks), no autocast is active
        and input, base weight and adapter share one dtype; everything else -- quantized bases,
        mixed dtypes, DoRA, several adapters -- takes the general path, which computes the same sum.
        Written for low per-call overhead (plain dict lookups; decoding calls it per token and layer).
        """
        name, base, dropout = self._fused_plan  # type: ignore[misc]
        modules = self._modules
        lora_a = modules["lora_A"]._modules[name]  # type: ignore[union-attr]
        lora_b = modules["lora_B"]._modules[name]  # type: ignore[union-attr]
        if (
            modules["base_layer"] is not base  # replaced behind our back (e.g. quantized later)
            or base._forward_pre_hooks
            or base._forward_hooks
            or base._backward_pre_hooks
            or base._backward_hooks
            or not (hook_free(lora_a) and hook_free(lora_b))  # type: ignore[arg-type]
            or any(GLOBAL_HOOKS)
        ):
            return None
        params = base._parameters
        weight, bias = params["weight"], params.get("bias")
        a = lora_a._parameters["weight"]  # type: ignore[union-attr]
        b = lora_b._parameters["weight"]  # type: ignore[union-attr]
        dtype = x.dtype
        if (
            weight.dtype != dtype  # type: ignore[union-attr]
            or a.dtype != dtype  # type: ignore[union-attr]
            or b.dtype != dtype  # type: ignore[union-attr]
            or type(weight) not in PLAIN_TENSORS
            or torch.is_autocast_enabled(x.device.type)
        ):
            return None
        if self.is_conv1d:
            weight = weight.t()  # type: ignore[union-attr]
        scaling = self.scaling[name]
        x_lora = dropout(x) if dropout is not None and self.training else None
        if torch.is_grad_enabled() and (
            x.requires_grad
            or a.requires_grad  # type: ignore[union-attr]
            or b.requires_grad  # type: ignore[union-attr]
            or weight.requires_grad  # type: ignore[union-attr]
            or (bias is not None and bias.requires_grad)
        ):
            return FusedLoraLinear.apply(x, x_lora, weight, bias, a, b, scaling)
        # nothing to differentiate (generation, evaluation): the same three kernels, no graph
        out = F.linear(x, weight, bias)  # type: ignore[arg-type]
        h = F.linear(x if x_lora is None else x_lora, a)  # type: ignore[arg-type]
        as_rows(out).addmm_(as_rows(h), b.t(), alpha=scaling)  # type: ignore[union-attr]
        return out

    def _mixed_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """A mixed-adapter batch: the base GEMM once, then each adapter group's low-rank (or DoRA)
        update added into its own rows -- one ``A``/``B`` product per adapter present in the batch."""
        result = self.base_layer(x, *args, **kwargs)
        base_out = result
        for name, rows in self._routing.groups(x.shape[0], x.device):  # type: ignore[union-attr]
            if name not in self.lora_A:
                continue  # "__base__" or an adapter that does not adapt this module
            sub = take_rows(x, rows)
            if name in self.lora_magnitude_vector:
                delta = self._dora_delta(name, sub, take_rows(base_out, rows))
            else:
                lora_a, lora_b = self.lora_A[name], self.lora_B[name]
                h = sub if sub.dtype == lora_a.weight.dtype else sub.to(lora_a.weight.dtype)
                if name in self._dropout_on and self.training:
                    h = self.lora_dropout[name](h)
                if (isinstance(rows, slice) and not torch.is_grad_enabled() and result.dtype == h.dtype
                        and result.is_contiguous() and hook_free(lora_a) and hook_free(lora_b)):
                    # a run of rows without grad: s (h A^T) B^T added into the result's own rows by
                    # one GEMM, as the single-adapter forward does (no gather, delta or scatter)
                    as_rows(result[rows]).addmm_(as_rows(F.linear(h, lora_a.weight)), lora_b.weight.t(),
                                                 alpha=self.scaling[name])
                    continue
                delta = lora_b(lora_a(h)) * self.scaling[name]
            result = add_rows(result, rows, delta)
        return result

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self._routing is not None:
            return self._mixed_forward(x, *args, **kwargs)
        if self._fused_plan is not None and not args and not kwargs:
            fused = self._fused_forward(x)
            if fused is not None:
                return fused
        result = self.base_layer(x, *args, **kwargs)
        if not self._forward_adapters:
            return result
        base_out = result
        # DoRA needs the untouched base output, so never add into it in place then
        in_place = not torch.is_grad_enabled() and not self._dora_forward
        for name in self._forward_adapters:
            if name in self.lora_magnitude_vector:
                delta = self._dora_delta(name, x, base_out)
                result = result + delta.to(result.dtype)
                continue
            lora_a = self.lora_A[name]
            lora_b = self.lora_B[name]
            h = x if x.dtype == lora_a.weight.dtype else x.to(lora_a.weight.dtype)
            if name in self._dropout_on and self.training:
                h = self.lora_dropout[name](h)
            scaling = self.scaling[name]
            if result.dtype == h.dtype and hook_free(lora_a) and hook_free(lora_b) and result.is_contiguous():
                # s (h A^T) B^T added by one GEMM (no output-sized intermediate); a quantized or
                # hooked base still runs as its own module above
                low = as_rows(F.linear(h, lora_a.weight))
                b_t = lora_b.weight.t()
                if in_place:
                    as_rows(result).addmm_(low, b_t, alpha=scaling)
                else:
                    result = torch.addmm(as_rows(result), low, b_t, alpha=scaling).view(result.shape)
                continue
            delta = lora_b(lora_a(h))
            if delta.dtype != result.dtype:
                delta = delta.to(result.dtype)
            if in_place:
                result.add_(delta, alpha=scaling)
            else:
                result = torch.add(result, delta, alpha=scaling)
        return result
