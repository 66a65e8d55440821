"""What LoHa and LoKr (the LyCORIS family) share: config fields, dropout, forward and merging.

Both build a full-size weight update ``dW`` (``(out, in)``) from small factors, times
``scaling = alpha / r``, and add ``x dW^T`` to the base output. Training adds two regularisers
PEFT users know:

* ``rank_dropout``: each output row of ``dW`` is dropped with probability ``p`` (LoHa rescales the
  kept rows by ``1 / mean(mask)``; LoKr only when ``rank_dropout_scale``);
* ``module_dropout``: the whole adapter is skipped for a forward with probability ``p``.

Neither applies in eval mode, so merging (``W += dW``) gives exactly the eval-mode forward. The
factors cost an ``out x in`` matrix per forward, like PEFT's implementation; that is the price of
a full-rank-capable update from few parameters.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from .config import AdapterConfig
from .constraints import param
from .layer import AdapterLayer
from .layer_utils import (
    adapter_factory_kwargs,
    freeze_unless_active,
    is_conv1d,
    linear_features,
    pattern_value,
    positive_int,
    refuse_quantized_merge,
    require_linear_like,
    sorted_list,
)


@dataclass
class LycorisConfig(AdapterConfig):
    """Fields common to :class:`~adapters.loha.LoHaConfig` and :class:`~adapters.lokr.LoKrConfig`
    (PEFT's names and defaults). Only Linear-like modules are adapted, so ``use_effective_conv2d``
    is kept for file compatibility and has no effect."""

    METHOD: ClassVar[str] = "LyCORIS"

    r: int = param(8, gt=0)
    alpha: float = param(8, gt=0)
    rank_dropout: float = param(0.0, ge=0.0, lt=1.0)
    module_dropout: float = param(0.0, ge=0.0, lt=1.0)
    use_effective_conv2d: bool = False
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    init_weights: bool | str = True
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        owner = type(self).__name__
        self.rank_dropout = float(self.rank_dropout)
        self.module_dropout = float(self.module_dropout)
        self.target_modules = sorted_list(self.target_modules)
        self.exclude_modules = sorted_list(self.exclude_modules)
        self.layers_to_transform = sorted_list(self.layers_to_transform)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(f"{owner}: layers_to_transform needs target_modules as a list, not a regex string")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"{owner}: layers_pattern only has an effect together with layers_to_transform")
        self.rank_pattern = dict(self.rank_pattern or {})
        self.alpha_pattern = dict(self.alpha_pattern or {})
        for key, value in self.rank_pattern.items():
            if not positive_int(value):
                raise ValueError(f"{owner}: rank_pattern[{key!r}] must be a positive integer, got {value!r}")

    def rank_for(self, module_name: str) -> int:
        return int(pattern_value(self.rank_pattern, module_name, self.r))

    def alpha_for(self, module_name: str) -> float:
        return float(pattern_value(self.alpha_pattern, module_name, self.alpha))

    def create_layer(self, target: nn.Module, adapter_name: str, module_name: str) -> AdapterLayer:
        require_linear_like(target, module_name, self.METHOD)
        layer = self.layer_class()(target)
        self.update_layer(layer, adapter_name, module_name)
        return layer

    def update_layer(self, layer: AdapterLayer, adapter_name: str, module_name: str) -> None:
        cls = self.layer_class()
        if not isinstance(layer, cls):
            raise TypeError(f"{module_name!r} is wrapped by {type(layer).__name__}, not a {self.METHOD} layer")
        layer.add_adapter(adapter_name, self, r=self.rank_for(module_name), alpha=self.alpha_for(module_name))

    def layer_class(self) -> type[LycorisLayer]:
        raise NotImplementedError


class LycorisLayer(AdapterLayer):
    """A Linear/Conv1D base plus adapters whose update is a full ``(out, in)`` delta built from factors.

    Subclasses create their factors (:meth:`_create_tensors`) and compute the unscaled delta
    (:meth:`_raw_delta_oi`); forward, dropout and merging are here.
    """

    other_param_names: ClassVar[tuple[str, ...]] = (
        "r",
        "alpha",
        "scaling",
        "rank_dropout",
        "rank_dropout_scale",
        "module_dropout",
    )
    # LoHa always rescales rank dropout by the kept fraction; LoKr only when asked
    ALWAYS_SCALE_RANK_DROPOUT: ClassVar[bool] = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.rank_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}
        self.module_dropout: dict[str, float] = {}
        self.is_conv1d = is_conv1d(base_layer)
        self.in_features, self.out_features = linear_features(base_layer)

    # ------------------------------------------------------------------ creation
    def add_adapter(self, adapter_name: str, config: LycorisConfig, *, r: int, alpha: float) -> None:
        if adapter_name in self.adapter_names:
            raise ValueError(f"adapter {adapter_name!r} already exists in this layer")
        self.r[adapter_name] = r
        self.alpha[adapter_name] = alpha
        self.scaling[adapter_name] = alpha / r
        self.rank_dropout[adapter_name] = float(config.rank_dropout)
        self.rank_dropout_scale[adapter_name] = bool(getattr(config, "rank_dropout_scale", False))
        self.module_dropout[adapter_name] = float(config.module_dropout)
        self._create_tensors(adapter_name, config, r, adapter_factory_kwargs(self.base_layer))
        freeze_unless_active(self, adapter_name, self.adapter_tensors(adapter_name).values())
        self._refresh()

    def _create_tensors(
        self, adapter_name: str, config: LycorisConfig, r: int, factory: dict[str, Any]
    ) -> None:
        raise NotImplementedError

    def _raw_delta_oi(self, adapter_name: str) -> torch.Tensor:
        """The method's ``(out, in)`` update before ``scaling``."""
        raise NotImplementedError

    def set_scale(self, adapter_name: str, scale: float) -> None:
        """``scaling = scale * alpha / r`` (PEFT's ``set_scale``), e.g. to fade an adapter."""
        if adapter_name in self.merged_adapters:
            raise ValueError(f"cannot rescale merged adapter {adapter_name!r}; unmerge first")
        self.scaling[adapter_name] = float(scale) * self.alpha[adapter_name] / self.r[adapter_name]

    # ------------------------------------------------------------------ weights
    def delta_oi(self, adapter_name: str, apply_rank_dropout: bool = False) -> torch.Tensor:
        """``scaling * dW`` as ``(out, in)``; with ``apply_rank_dropout`` some output rows dropped."""
        weight = self._raw_delta_oi(adapter_name) * self.scaling[adapter_name]
        p = self.rank_dropout[adapter_name]
        if apply_rank_dropout and p > 0:
            keep = (torch.rand(weight.shape[0], device=weight.device) > p).to(weight.dtype)
            if self.ALWAYS_SCALE_RANK_DROPOUT or self.rank_dropout_scale[adapter_name]:
                keep = keep / keep.mean().clamp_min(torch.finfo(weight.dtype).tiny)
            weight = weight * keep[:, None]
        return weight

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``W_merged - W`` in the base weight's own layout (Conv1D stores ``(in, out)``)."""
        delta = self.delta_oi(adapter_name)
        return delta.T if self.is_conv1d else delta

    def merge(self, adapter_names: Iterable[str] | None = None) -> None:
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        if any(n in self.adapter_names and n not in self.merged_adapters for n in names):
            refuse_quantized_merge(self.base_layer, type(self).__name__)
        super().merge(names)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self._routing is not None:
            return self._grouped_forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        for name in self._forward_adapters:
            p_module = self.module_dropout[name]
            if self.training and p_module > 0 and float(torch.rand(1)) <= p_module:
                continue  # module dropout: this adapter sits out this forward
            delta = self.delta_oi(name, apply_rank_dropout=self.training)
            h = x if x.dtype == delta.dtype else x.to(delta.dtype)
            update = F.linear(h, delta)  # the bias is already in the base output
            result = result + update.to(result.dtype)
        return result
