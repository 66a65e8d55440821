"""LoRA and DoRA: config and the layers wrapping ``nn.Linear``, GPT-2's ``Conv1D``, ``nn.Embedding``
and bitsandbytes' quantized ``Linear4bit`` / ``Linear8bitLt`` (QLoRA).

The update is ``W x + b + scaling * B A dropout(x)`` with ``scaling = alpha / r`` (or
``alpha / sqrt(r)`` for rsLoRA). Parameter and attribute names follow PEFT (``lora_A``,
``lora_B``, ``lora_embedding_A``, ``lora_embedding_B``, ``lora_magnitude_vector``,
``base_layer``) so that checkpoints are interchangeable with ``peft``.

DoRA (``use_dora=True``, Liu et al. 2024) re-parameterises the adapted weight as magnitude times
direction: ``W' = m * (W + s B A) / ||W + s B A||`` where the norm is taken per output feature
(the L2 norm of each row of the ``(out, in)`` matrix, PEFT's "column norm" of the paper's
``(in, out)`` layout) and is detached from the graph as the paper's section 4.3 and PEFT do. ``m``
starts at that norm, so a fresh DoRA adapter equals its LoRA counterpart. Forward adds
``(f - 1) * (W x) + f * s * B A x`` with ``f = m / norm`` to the base output, which is exactly
``W' x + b`` without materialising ``W'``.

On a quantized base the base output comes from bitsandbytes and the adapter runs in the layer's
compute dtype; merging dequantizes, merges and re-quantizes with the layer's own settings, and
unmerging restores the original quantized tensor exactly (see :mod:`adapters.quantization`).
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from collections.abc import Iterable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from . import quantization as quant
from .config import AdapterConfig, register_config
from .layer import AdapterLayer
from .routing import add_rows, take_rows

try:  # GPT-2 style layers; transformers is an optional dependency for this module
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is installed in every supported setup
    Conv1D = None  # type: ignore[assignment,misc]

ALL_LINEAR = "all-linear"
_INIT_CHOICES = (True, False, "gaussian")
_BIAS_CHOICES = ("none", "all", "lora_only")

# PEFT LoraConfig keys that change the math; loading a config that enables one is refused rather
# than silently producing a different model.
_UNSUPPORTED_IF_SET: dict[str, Any] = {
    "lora_bias": False,
    "use_qalora": False,
    "target_parameters": None,
    "trainable_token_indices": None,
    "layer_replication": None,
    "alora_invocation_tokens": None,
    "arrow_config": None,
}


def _pattern_value(patterns: dict[str, Any], module_name: str, default: Any) -> Any:
    """PEFT's rank/alpha pattern lookup: first key whose regex matches the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


@register_config
@dataclass
class LoraConfig(AdapterConfig):
    """LoRA hyper-parameters with PEFT's names and defaults.

    ``target_modules`` is a list of module-name suffixes, a regex (``re.fullmatch`` on the full
    module name) or ``"all-linear"`` (every Linear/Conv1D except the output head).
    ``init_lora_weights``: ``True`` (A kaiming-uniform, B zero -> the model starts unchanged),
    ``"gaussian"`` (A ~ N(0, 1/r)), or ``False`` (both random, a non-zero update; for tests).
    ``use_dora``: weight-decomposed LoRA (a trainable per-output magnitude ``lora_magnitude_vector``
    on top of the low-rank direction update); Linear, Conv1D, Embedding and quantized Linear.
    """

    PEFT_TYPE: ClassVar[str] = "LORA"
    ADAPTER_PREFIX: ClassVar[str] = "lora_"

    r: int = 8
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    fan_in_fan_out: bool = False
    bias: str = "none"
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"LoraConfig: use_dora must be true or false, got {self.use_dora!r}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig: r must be a positive integer, got {self.r!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"LoraConfig: lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in _BIAS_CHOICES:
            raise ValueError(f"LoraConfig: bias must be one of {_BIAS_CHOICES}, got {self.bias!r}")
        if self.init_lora_weights not in _INIT_CHOICES:
            raise ValueError(
                f"LoraConfig: init_lora_weights must be one of {_INIT_CHOICES}, got {self.init_lora_weights!r}"
            )
        if isinstance(self.target_modules, (set, frozenset, tuple)):
            self.target_modules = sorted(self.target_modules)
        if isinstance(self.exclude_modules, (set, frozenset, tuple)):
            self.exclude_modules = sorted(self.exclude_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.layers_to_transform, (tuple, set)):
            self.layers_to_transform = sorted(self.layers_to_transform)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError("LoraConfig: layers_to_transform needs target_modules as a list, not a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("LoraConfig: layers_pattern only has an effect together with layers_to_transform")
        for key, value in self.rank_pattern.items():
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LoraConfig: rank_pattern[{key!r}] must be a positive integer, got {value!r}")

    @classmethod
    def _check_unsupported(cls, data: dict[str, Any]) -> None:
        for key, default in _UNSUPPORTED_IF_SET.items():
            value = data.get(key, default)
            if value not in (default, None, False, [], {}):
                raise ValueError(f"LoraConfig: {key}={value!r} is not supported by this library")

    # ------------------------------------------------------------------ per-module values
    def rank_for(self, module_name: str) -> int:
        return int(_pattern_value(self.rank_pattern, module_name, self.r))

    def alpha_for(self, module_name: str) -> float:
        return float(_pattern_value(self.alpha_pattern, module_name, self.lora_alpha))

    def scaling_for(self, module_name: str) -> float:
        r = self.rank_for(module_name)
        alpha = self.alpha_for(module_name)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    # ------------------------------------------------------------------ layer factory
    def create_layer(self, target: nn.Module, adapter_name: str, module_name: str) -> AdapterLayer:
        if isinstance(target, nn.Embedding):
            if quant.is_quantized(target):
                raise TypeError(
                    f"LoRA cannot wrap the quantized embedding {module_name!r}; keep embeddings unquantized"
                )
            layer: AdapterLayer = LoraEmbedding(target)
        elif isinstance(target, nn.Linear) or (Conv1D is not None and isinstance(target, Conv1D)):
            layer = LoraLinear(target)  # bitsandbytes Linear4bit / Linear8bitLt are nn.Linear subclasses
        else:
            raise TypeError(
                f"LoRA cannot wrap {module_name!r} of type {type(target).__name__}; "
                "supported: Linear, Conv1D, Embedding, bitsandbytes Linear4bit/Linear8bitLt"
            )
        self.update_layer(layer, adapter_name, module_name)
        return layer

    def update_layer(self, layer: AdapterLayer, adapter_name: str, module_name: str) -> None:
        if not isinstance(layer, LoraLayer):
            raise TypeError(f"{module_name!r} is wrapped by {type(layer).__name__}, not a LoRA layer")
        if isinstance(layer, LoraLinear) and layer.is_conv1d and not self.fan_in_fan_out:
            warnings.warn(
                f"{module_name!r} is a Conv1D (weight stored as (in, out)); setting fan_in_fan_out=True",
                stacklevel=3,
            )
            self.fan_in_fan_out = True
        layer.add_adapter(
            adapter_name,
            r=self.rank_for(module_name),
            scaling=self.scaling_for(module_name),
            dropout=float(self.lora_dropout),
            init=self.init_lora_weights,
            use_dora=self.use_dora,
        )

    def layer_class(self) -> type[AdapterLayer]:
        return LoraLayer


class _Magnitude(nn.Module):
    """DoRA's per-output magnitude, held as ``.weight`` so parameter names match PEFT's
    (``lora_magnitude_vector.<adapter>.weight``); saved as ``<path>.lora_magnitude_vector``."""

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)


def _matmul(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``b @ a``; half precision on CPU goes through float32 (slow and lossy there otherwise)."""
    if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16):
        return (b.float() @ a.float()).to(a.dtype)
    return b @ a


# Module hooks anywhere (DeepSpeed ZeRO-3 gathers partitioned weights in forward pre-hooks, profilers
# and debuggers add forward hooks) mean a module must be *called*, not bypassed by the fused path.
_GLOBAL_HOOKS = tuple(
    getattr(torch.nn.modules.module, name)
    for name in (
        "_global_forward_pre_hooks",
        "_global_forward_hooks",
        "_global_backward_pre_hooks",
        "_global_backward_hooks",
    )
    if hasattr(torch.nn.modules.module, name)
)
_PLAIN_TENSORS = (nn.Parameter, torch.Tensor)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-D ``(rows, last dim)`` view (also for 1-D and empty inputs)."""
    return t.view(-1, t.shape[-1]) if t.numel() else t.view(math.prod(t.shape[:-1]), t.shape[-1])


def _hook_free(module: nn.Module) -> bool:
    return not (
        module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks or module._backward_hooks
    )


class _FusedLoraLinear(torch.autograd.Function):
    """``y = x W^T + b + s (x' A^T) B^T`` as one autograd node, ``x'`` the (dropped-out) LoRA input.

    Exactly the LoRA formula, with fewer kernels and no intermediate of the output's size: forward
    runs the base GEMM, the ``r``-wide ``x' A^T`` and adds ``s h B^T`` into the base output in
    place (``addmm_``); backward scales only ``r``-wide tensors and accumulates the LoRA part of
    ``dL/dx`` into the base part in place. The unfused chain (``linear``, ``linear``, ``linear``,
    ``mul``, ``add``) writes three output-sized tensors forward, one more backward, plus the
    input-sized sum of the two ``dL/dx`` branches.

    ``x_lora`` is ``None`` when the LoRA branch sees ``x`` itself (no dropout). ``weight`` is the
    ``(out, in)`` view of the base weight; its and the bias's gradients are computed only when
    they require grad (``bias="all"``/``"lora_only"`` or an unfrozen base).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        x_lora: torch.Tensor | None,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        lora_a: torch.Tensor,
        lora_b: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        src = x if x_lora is None else x_lora
        out = F.linear(x, weight, bias)
        h = F.linear(src, lora_a)
        _rows(out).addmm_(_rows(h), lora_b.t(), alpha=scaling)
        # keep only what the wanted gradients read: with dropout the base input is not needed
        # unless the base weight trains (as in the unfused graph, where only the dropout output is)
        need_w, need_a, need_b = ctx.needs_input_grad[2], ctx.needs_input_grad[4], ctx.needs_input_grad[5]
        ctx.save_for_backward(
            x if need_w or (need_a and x_lora is None) else None,
            x_lora if need_a else None,
            h if need_b else None,
            weight,
            lora_a,
            lora_b,
        )
        ctx.shapes = (x.shape, None if x_lora is None else x_lora.shape)
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x, x_lora, h, weight, lora_a, lora_b = ctx.saved_tensors
        need_x, need_xl, need_w, need_bias, need_a, need_b = ctx.needs_input_grad[:6]
        x_shape, xl_shape = ctx.shapes
        fused_x = xl_shape is None  # the LoRA branch read x itself
        s = ctx.scaling
        g = _rows(grad.contiguous())
        gx = gxl = gw = gbias = ga = gb = None
        gh = None
        if need_a or need_xl or (need_x and fused_x):
            gh = (g @ lora_b).mul_(s)  # (N, r): the only place the scaling touches activations
        if need_b:
            gb = (g.t() @ _rows(h)).mul_(s)
        if need_a:
            ga = gh.t() @ _rows((x if fused_x else x_lora).contiguous())  # type: ignore[union-attr]
        if need_x:
            gx = g @ weight
            if fused_x:
                gx.addmm_(gh, lora_a)  # type: ignore[arg-type]
            gx = gx.view(x_shape)
        if need_xl and not fused_x:
            gxl = (gh @ lora_a).view(xl_shape)  # type: ignore[operator]
        if need_w:
            gw = g.t() @ _rows(x.contiguous())
        if need_bias and ctx.has_bias:
            gbias = g.sum(0)
        return gx, gxl, gw, gbias, ga, gb, None


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
        """Adapters live on the base weight's device, in its dtype when that is floating point, or in
        the compute dtype of a quantized base (QLoRA)."""
        weight = self.base_layer.weight
        if quant.is_quantized(self.base_layer):
            return {"device": weight.device, "dtype": quant.compute_dtype(self.base_layer)}
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        return {"device": weight.device, "dtype": dtype}

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
            norm = torch.linalg.norm(weight + self._lora_delta_oi(adapter_name), dim=1)
        self.lora_magnitude_vector[adapter_name] = _Magnitude(norm.to(a.dtype))

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
        magnitude = self.lora_magnitude_vector[adapter_name].weight
        with torch.no_grad():
            norm = torch.linalg.norm(weight_oi.detach() + self._lora_delta_oi(adapter_name).to(weight_oi.dtype), dim=1)
        return magnitude / norm.to(magnitude.dtype)

    # ------------------------------------------------------------------ merging
    def _unmerged_weight_oi(self, weight_oi: torch.Tensor) -> torch.Tensor:
        """The base weight before any merge, recovered from the merged one (float32).

        Merged LoRA adapters added ``s B A``; merged DoRA adapters added ``(f - 1) W0 + f s B A``
        (row-wise ``f``), so ``W = W0 (1 + sum (f - 1)) + sum_lora s B A + sum_dora f s B A``.
        Keeping only the per-row factors (not a copy of ``W0``) is what lets several DoRA adapters
        merge and unmerge in any combination.
        """
        w = weight_oi.float()
        if not self.merged_adapters:
            return w
        w = w.clone()
        denominator: torch.Tensor | None = None
        for name in self.merged_adapters:
            delta = self._lora_delta_oi(name).float()
            factor = self._dora_factors.get(name)
            if factor is None:
                w.sub_(delta)
            else:
                w.sub_(factor[:, None] * delta)
                denominator = factor - 1 if denominator is None else denominator + (factor - 1)
        if denominator is not None:
            w.div_((1 + denominator)[:, None])
        return w

    def _merge_delta_oi(self, adapter_name: str, weight_oi: torch.Tensor) -> torch.Tensor:
        """What merging ``adapter_name`` adds to the ``(out, in)`` weight (float32).

        LoRA: ``s B A``. DoRA: ``W' - W0 = (f - 1) W0 + f s B A`` -- additive, so adapters merged
        together give exactly the forward of those adapters active together.
        """
        delta = self._lora_delta_oi(adapter_name).float()
        if adapter_name not in self.lora_magnitude_vector:
            return delta
        base = self._unmerged_weight_oi(weight_oi)
        factor = self._dora_factors.get(adapter_name)
        if factor is None:  # merging: the norm is the one forward uses, of the unmerged weight
            magnitude = self.lora_magnitude_vector[adapter_name].weight.detach().float()
            factor = magnitude / torch.linalg.norm(base + delta, dim=1)
            self._dora_factors[adapter_name] = factor
        return (factor - 1)[:, None] * base + factor[:, None] * delta

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


class LoraLinear(LoraLayer):
    """LoRA around ``nn.Linear``, bitsandbytes' quantized Linear, or ``transformers`` ``Conv1D``
    (whose weight is stored transposed)."""

    adapter_layer_names: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B", "lora_magnitude_vector")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.is_conv1d = Conv1D is not None and isinstance(base_layer, Conv1D)
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
        return (factor - 1) * plain + factor * (lora_b(lora_a(h)) * self.scaling[name])

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
            or not (_hook_free(lora_a) and _hook_free(lora_b))  # type: ignore[arg-type]
            or any(_GLOBAL_HOOKS)
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
            or type(weight) not in _PLAIN_TENSORS
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
            return _FusedLoraLinear.apply(x, x_lora, weight, bias, a, b, scaling)
        # nothing to differentiate (generation, evaluation): the same three kernels, no graph
        out = F.linear(x, weight, bias)  # type: ignore[arg-type]
        h = F.linear(x if x_lora is None else x_lora, a)  # type: ignore[arg-type]
        _rows(out).addmm_(_rows(h), b.t(), alpha=scaling)  # type: ignore[union-attr]
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
            if result.dtype == h.dtype and _hook_free(lora_a) and _hook_free(lora_b) and result.is_contiguous():
                # s (h A^T) B^T added by one GEMM (no output-sized intermediate); a quantized or
                # hooked base still runs as its own module above
                low = _rows(F.linear(h, lora_a.weight))
                b_t = lora_b.weight.t()
                if in_place:
                    _rows(result).addmm_(low, b_t, alpha=scaling)
                else:
                    result = torch.addmm(_rows(result), low, b_t, alpha=scaling).view(result.shape)
                continue
            delta = lora_b(lora_a(h))
            if delta.dtype != result.dtype:
                delta = delta.to(result.dtype)
            if in_place:
                result.add_(delta, alpha=scaling)
            else:
                result = torch.add(result, delta, alpha=scaling)
        return result


class LoraEmbedding(LoraLayer):
    """LoRA around ``nn.Embedding``: ``A`` is (r, num_embeddings), ``B`` is (embedding_dim, r).

    Looking up rows of ``A^T`` replaces the one-hot product, so the update costs an (r x dim)
    matmul per token. Dropout is not applied to token ids (as in PEFT). For DoRA the "output"
    axis is the embedding dimension: ``m`` has ``embedding_dim`` entries.
    """

    adapter_layer_names: ClassVar[tuple[str, ...]] = (
        "lora_embedding_A",
        "lora_embedding_B",
        "lora_magnitude_vector",
    )
    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.lora_embedding_A = nn.ParameterDict()
        self.lora_embedding_B = nn.ParameterDict()
        self.in_features = int(base_layer.num_embeddings)
        self.out_features = int(base_layer.embedding_dim)

    def _create_tensors(self, adapter_name: str, r: int, init: bool | str) -> None:
        kw = self._factory_kwargs()
        weight_a = torch.empty(r, self.in_features, **kw)
        weight_b = torch.empty(self.out_features, r, **kw)
        if init is False:
            nn.init.normal_(weight_a)
            nn.init.normal_(weight_b)
        else:  # True and "gaussian": A zero, B normal (nn.Embedding's own init)
            nn.init.zeros_(weight_a)
            nn.init.normal_(weight_b)
        self.lora_embedding_A[adapter_name] = nn.Parameter(weight_a)
        self.lora_embedding_B[adapter_name] = nn.Parameter(weight_b)

    def _lora_pair(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lora_embedding_A[adapter_name], self.lora_embedding_B[adapter_name]

    def _weight_oi(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T

    def _embed_scale(self) -> torch.Tensor | float | None:
        scale = getattr(self.base_layer, "embed_scale", None)
        if isinstance(scale, torch.Tensor) and scale.numel() != 1:
            return None
        return scale

    def _embed(self, ids: torch.Tensor, table: torch.Tensor, scale: torch.Tensor | float | None) -> torch.Tensor:
        """Look ``ids`` up in ``table`` with the base embedding's options (and its scale if given)."""
        base = self.base_layer
        out = F.embedding(
            ids,
            table,
            padding_idx=base.padding_idx,
            max_norm=base.max_norm,
            norm_type=base.norm_type,
            scale_grad_by_freq=base.scale_grad_by_freq,
            sparse=base.sparse,
        )
        if scale is not None:
            out = out * (scale.to(out.dtype) if isinstance(scale, torch.Tensor) else scale)
        return out

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self._routing is not None:
            return self._grouped_forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if not self._forward_adapters:
            return result
        base = self.base_layer
        base_out = result
        scale = self._embed_scale()
        for name in self._forward_adapters:
            delta = self._embed(x, self.lora_embedding_A[name].T, None) @ self.lora_embedding_B[name].T
            if scale is not None:
                delta = delta * (scale.to(delta.dtype) if isinstance(scale, torch.Tensor) else scale)
            if name in self.lora_magnitude_vector:
                weight = self._weight_oi(base.weight)
                plain = base_out
                if self.merged_adapters:  # DoRA's W is the one before other adapters were merged
                    weight = self._unmerged_weight_oi(weight)
                    plain = self._embed(x, weight.T.to(base_out.dtype), scale)
                weight = weight.to(delta.dtype)
                factor = self._dora_factor(name, weight)
                delta = (factor - 1) * plain + factor * (delta * self.scaling[name])
                result = result + delta.to(result.dtype)
                continue
            if delta.dtype != result.dtype:
                delta = delta.to(result.dtype)
            result = torch.add(result, delta, alpha=self.scaling[name])
        return result
