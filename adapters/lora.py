"""LoRA: config and the layers wrapping ``nn.Linear``, GPT-2's ``Conv1D`` and ``nn.Embedding``.

The update is ``W x + b + scaling * B A dropout(x)`` with ``scaling = alpha / r`` (or
``alpha / sqrt(r)`` for rsLoRA). Parameter and attribute names follow PEFT (``lora_A``,
``lora_B``, ``lora_embedding_A``, ``lora_embedding_B``, ``base_layer``) so that checkpoints are
interchangeable with ``peft``.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig, register_config
from .layer import AdapterLayer

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
    "use_dora": False,
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

    def __post_init__(self) -> None:
        super().__post_init__()
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
            layer: AdapterLayer = LoraEmbedding(target)
        elif isinstance(target, nn.Linear) or (Conv1D is not None and isinstance(target, Conv1D)):
            layer = LoraLinear(target)
        else:
            raise TypeError(
                f"LoRA cannot wrap {module_name!r} of type {type(target).__name__}; "
                "supported: Linear, Conv1D, Embedding"
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
        )

    def layer_class(self) -> type[AdapterLayer]:
        return LoraLayer


class LoraLayer(AdapterLayer):
    """Common LoRA state: rank, scaling and dropout per adapter."""

    other_param_names: ClassVar[tuple[str, ...]] = ("r", "scaling", "lora_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict()
        # adapters whose dropout p > 0: the only ones that pay for a dropout call
        self._dropout_on: set[str] = set()

    def _factory_kwargs(self) -> dict[str, Any]:
        """Adapters live on the base weight's device, in its dtype when that is floating point."""
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        return {"device": weight.device, "dtype": dtype}

    def add_adapter(self, adapter_name: str, *, r: int, scaling: float, dropout: float, init: bool | str) -> None:
        if adapter_name in self.adapter_names:
            raise ValueError(f"adapter {adapter_name!r} already exists in this layer")
        self.r[adapter_name] = r
        self.scaling[adapter_name] = scaling
        self.lora_dropout[adapter_name] = nn.Dropout(p=dropout) if dropout > 0 else nn.Identity()
        if dropout > 0:
            self._dropout_on.add(adapter_name)
        self._create_tensors(adapter_name, r, init)
        if adapter_name not in self.active_adapters:
            # a new adapter is inactive until set_adapter (as in PEFT); keep it frozen meanwhile
            for tensor in self.adapter_tensors(adapter_name).values():
                tensor.requires_grad_(False)
        self._refresh()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._dropout_on.discard(adapter_name)

    def set_scale(self, adapter_name: str, scaling: float) -> None:
        """Override the scaling of one adapter (e.g. to fade an adapter in or out)."""
        if adapter_name in self.merged_adapters:
            raise ValueError(f"cannot rescale merged adapter {adapter_name!r}; unmerge first")
        self.scaling[adapter_name] = float(scaling)

    def _create_tensors(self, adapter_name: str, r: int, init: bool | str) -> None:
        raise NotImplementedError


class LoraLinear(LoraLayer):
    """LoRA around ``nn.Linear`` or ``transformers`` ``Conv1D`` (whose weight is stored transposed)."""

    adapter_layer_names: ClassVar[tuple[str, ...]] = ("lora_A", "lora_B")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.is_conv1d = Conv1D is not None and isinstance(base_layer, Conv1D)
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

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        a = self.lora_A[adapter_name].weight
        b = self.lora_B[adapter_name].weight
        if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16):
            delta = (b.float() @ a.float()).to(a.dtype)  # half matmul on CPU is slow and lossy
        else:
            delta = b @ a
        if self.is_conv1d:
            delta = delta.T
        return delta * self.scaling[adapter_name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if not self._forward_adapters:
            return result
        in_place = not torch.is_grad_enabled()
        for name in self._forward_adapters:
            lora_a = self.lora_A[name]
            h = x if x.dtype == lora_a.weight.dtype else x.to(lora_a.weight.dtype)
            if name in self._dropout_on and self.training:
                h = self.lora_dropout[name](h)
            delta = self.lora_B[name](lora_a(h))
            if delta.dtype != result.dtype:
                delta = delta.to(result.dtype)
            if in_place:
                result.add_(delta, alpha=self.scaling[name])
            else:
                result = torch.add(result, delta, alpha=self.scaling[name])
        return result


class LoraEmbedding(LoraLayer):
    """LoRA around ``nn.Embedding``: ``A`` is (r, num_embeddings), ``B`` is (embedding_dim, r).

    Looking up rows of ``A^T`` replaces the one-hot product, so the update costs an (r x dim)
    matmul per token. Dropout is not applied to token ids (as in PEFT).
    """

    adapter_layer_names: ClassVar[tuple[str, ...]] = ("lora_embedding_A", "lora_embedding_B")

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

    def _embed_scale(self) -> torch.Tensor | float | None:
        scale = getattr(self.base_layer, "embed_scale", None)
        if isinstance(scale, torch.Tensor) and scale.numel() != 1:
            return None
        return scale

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        a = self.lora_embedding_A[adapter_name]
        b = self.lora_embedding_B[adapter_name]
        if a.device.type == "cpu" and a.dtype in (torch.float16, torch.bfloat16):
            delta = (b.float() @ a.float()).to(a.dtype)
        else:
            delta = b @ a
        return delta.T * self.scaling[adapter_name]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if not self._forward_adapters:
            return result
        base = self.base_layer
        scale = self._embed_scale()
        for name in self._forward_adapters:
            after_a = F.embedding(
                x,
                self.lora_embedding_A[name].T,
                padding_idx=base.padding_idx,
                max_norm=base.max_norm,
                norm_type=base.norm_type,
                scale_grad_by_freq=base.scale_grad_by_freq,
                sparse=base.sparse,
            )
            delta = after_a @ self.lora_embedding_B[name].T
            if scale is not None:
                delta = delta * (scale.to(delta.dtype) if isinstance(scale, torch.Tensor) else scale)
            if delta.dtype != result.dtype:
                delta = delta.to(result.dtype)
            result = torch.add(result, delta, alpha=self.scaling[name])
        return result
