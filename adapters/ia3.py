"""(IA)^3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than
In-Context Learning"): learned vectors that rescale activations.

For a wrapped Linear-like module ``y = W x + b`` with vector ``l``:

* attention keys/values and other non-feed-forward targets scale the *output*:
  ``y = (W x + b) * l`` (``l`` has ``out`` entries, stored ``(out, 1)``);
* modules listed in ``feedforward_modules`` scale the *input*: ``y = W (x * l) + b``
  (``l`` has ``in`` entries, stored ``(1, in)``), the paper's rescaling of the inner FFN activation.

``l`` starts at one, so a fresh adapter leaves the model unchanged. Both forms fold into the base
weight: merging multiplies ``W``'s rows (and ``b``) or columns by ``l``; unmerging divides again.
Entries of ``l`` that are exactly zero cannot be divided out, so merging an adapter holding a zero
keeps a copy of the original weight for unmerging.

Saved keys (PEFT's): ``base_model.model.<module path>.ia3_l``. Several adapters active on one layer
multiply. Config defaults (``target_modules``/``feedforward_modules`` when unset) are PEFT's per
model type, recorded in the config when resolved.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .config import AdapterConfig, register_config
from .layer import AdapterLayer
from .layer_utils import (
    adapter_factory_kwargs,
    freeze_unless_active,
    is_conv1d,
    linear_features,
    refuse_quantized_merge,
    require_linear_like,
    sorted_list,
)

# PEFT's IA3 defaults per model type (facts, so that an unset config resolves as in PEFT).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "t5": ["k", "v", "wo"],
    "mt5": ["k", "v", "wi_1"],
    "gpt2": ["c_attn", "mlp.c_proj"],
    "bloom": ["query_key_value", "mlp.dense_4h_to_h"],
    "roberta": ["key", "value", "output.dense"],
    "opt": ["q_proj", "k_proj", "fc2"],
    "gpt_neox": ["query_key_value", "dense_4h_to_h"],
    "bart": ["q_proj", "v_proj", "fc2"],
    "llama": ["k_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "v_proj", "down_proj"],
    "bert": ["key", "value", "output.dense"],
    "falcon": ["query_key_value", "dense_4h_to_h"],
    "phi": ["q_proj", "v_proj", "fc2"],
    "gemma": ["q_proj", "v_proj", "down_proj"],
    "gemma2": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "v_proj", "down_proj"],
    "qwen3": ["q_proj", "v_proj", "down_proj"],
}
DEFAULT_FEEDFORWARD_MODULES: dict[str, list[str]] = {
    "t5": ["wo"],
    "mt5": [],
    "gpt2": ["mlp.c_proj"],
    "bloom": ["mlp.dense_4h_to_h"],
    "roberta": ["output.dense"],
    "opt": ["fc2"],
    "gpt_neox": ["dense_4h_to_h"],
    "bart": ["fc2"],
    "llama": ["down_proj"],
    "mistral": ["down_proj"],
    "bert": ["output.dense"],
    "falcon": ["dense_4h_to_h"],
    "phi": ["fc2"],
    "gemma": ["down_proj"],
    "gemma2": ["down_proj"],
    "qwen2": ["down_proj"],
    "qwen3": ["down_proj"],
}


@register_config
@dataclass
class IA3Config(AdapterConfig):
    """(IA)^3 hyper-parameters with PEFT's names and defaults.

    ``target_modules``: module-name suffixes, a regex or ``"all-linear"`` (PEFT's rules);
    ``feedforward_modules``: the targets whose *input* is scaled -- suffixes (PEFT matches them with
    ``endswith``) or a regex (``re.fullmatch``); as a list it must be a subset of ``target_modules``.
    ``init_ia3_weights=False`` draws the vectors from ``N(0, 1)`` instead of ones (for tests).
    """

    PEFT_TYPE: ClassVar[str] = "IA3"
    ADAPTER_PREFIX: ClassVar[str] = "ia3_"

    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    feedforward_modules: list[str] | str | None = None
    fan_in_fan_out: bool = False
    modules_to_save: list[str] | None = None
    init_ia3_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.target_modules = sorted_list(self.target_modules)
        self.exclude_modules = sorted_list(self.exclude_modules)
        self.feedforward_modules = sorted_list(self.feedforward_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        if not isinstance(self.init_ia3_weights, bool):
            raise ValueError(f"IA3Config: init_ia3_weights must be true or false, got {self.init_ia3_weights!r}")
        if isinstance(self.feedforward_modules, list) and isinstance(self.target_modules, list):
            extra = sorted(set(self.feedforward_modules) - set(self.target_modules))
            if extra:
                raise ValueError(
                    f"IA3Config: feedforward_modules must be a subset of target_modules; {extra} are not targets"
                )

    # ------------------------------------------------------------------ targets
    def find_target_modules(self, model: nn.Module) -> list[str]:
        """PEFT's per-architecture defaults fill unset ``target_modules``/``feedforward_modules``
        (recorded in the config so the saved file is explicit), then the usual targeting rules."""
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if self.target_modules is None or self.target_modules == []:
            if model_type not in DEFAULT_TARGET_MODULES:
                raise ValueError(
                    f"IA3Config: target_modules is not set and there is no default for model_type {model_type!r}; "
                    f"defaults exist for {', '.join(sorted(DEFAULT_TARGET_MODULES))}"
                )
            self.target_modules = list(DEFAULT_TARGET_MODULES[model_type])
        if self.feedforward_modules is None:
            if model_type not in DEFAULT_FEEDFORWARD_MODULES:
                raise ValueError(
                    f"IA3Config: feedforward_modules is not set and there is no default for model_type {model_type!r}; "
                    "give a list (possibly empty) of the targets whose input is scaled"
                )
            self.feedforward_modules = list(DEFAULT_FEEDFORWARD_MODULES[model_type])
        return super().find_target_modules(model)

    def is_feedforward(self, module_name: str) -> bool:
        """Whether ``module_name`` scales its input (PEFT's matching: ``endswith`` or regex fullmatch)."""
        ff = self.feedforward_modules
        if not ff:
            return False
        if isinstance(ff, str):
            return re.fullmatch(ff, module_name) is not None
        return any(module_name.endswith(name) for name in ff)

    # ------------------------------------------------------------------ layer factory
    def create_layer(self, target: nn.Module, adapter_name: str, module_name: str) -> AdapterLayer:
        require_linear_like(target, module_name, "IA3")
        layer = IA3Layer(target)
        self.update_layer(layer, adapter_name, module_name)
        return layer

    def update_layer(self, layer: AdapterLayer, adapter_name: str, module_name: str) -> None:
        if not isinstance(layer, IA3Layer):
            raise TypeError(f"{module_name!r} is wrapped by {type(layer).__name__}, not an IA3 layer")
        if layer.is_conv1d != self.fan_in_fan_out:
            kind = "a Conv1D (weight stored as (in, out))" if layer.is_conv1d else "a Linear"
            warnings.warn(
                f"{module_name!r} is {kind}; setting fan_in_fan_out={layer.is_conv1d}", stacklevel=3
            )
            self.fan_in_fan_out = layer.is_conv1d
        layer.add_adapter(adapter_name, feedforward=self.is_feedforward(module_name), init=self.init_ia3_weights)

    def layer_class(self) -> type[AdapterLayer]:
        return IA3Layer


class IA3Layer(AdapterLayer):
    """(IA)^3 vectors around ``nn.Linear`` (bitsandbytes' quantized Linear included) or GPT-2 ``Conv1D``.

    Whether an adapter scales the input or the output is recorded per adapter (``is_feedforward``),
    so adapters with different ``feedforward_modules`` can share the layer.
    """

    adapter_layer_names: ClassVar[tuple[str, ...]] = ("ia3_l",)
    other_param_names: ClassVar[tuple[str, ...]] = ("is_feedforward",)

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.ia3_l = nn.ParameterDict()
        self.is_feedforward: dict[str, bool] = {}
        self.is_conv1d = is_conv1d(base_layer)
        self.in_features, self.out_features = linear_features(base_layer)
        # originals of weights whose merged vector held a zero (division cannot undo those)
        self._merge_snapshots: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def add_adapter(self, adapter_name: str, *, feedforward: bool, init: bool) -> None:
        if adapter_name in self.adapter_names:
            raise ValueError(f"adapter {adapter_name!r} already exists in this layer")
        shape = (1, self.in_features) if feedforward else (self.out_features, 1)
        vector = torch.empty(shape, **adapter_factory_kwargs(self.base_layer))
        if init:
            nn.init.ones_(vector)
        else:
            nn.init.normal_(vector)
        self.ia3_l[adapter_name] = nn.Parameter(vector)
        self.is_feedforward[adapter_name] = feedforward
        freeze_unless_active(self, adapter_name, [self.ia3_l[adapter_name]])
        self._refresh()

    # ------------------------------------------------------------------ forward
    def _scales(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The products of the forward adapters' input and output vectors (``None``: no such adapter)."""
        scale_in: torch.Tensor | None = None
        scale_out: torch.Tensor | None = None
        for name in self._forward_adapters:
            vector = self.ia3_l[name].flatten()
            if self.is_feedforward[name]:
                scale_in = vector if scale_in is None else scale_in * vector
            else:
                scale_out = vector if scale_out is None else scale_out * vector
        return scale_in, scale_out

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged_adapters:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self._routing is not None:
            return self._grouped_forward(x, *args, **kwargs)
        if not self._forward_adapters:
            return self.base_layer(x, *args, **kwargs)
        scale_in, scale_out = self._scales()
        if scale_in is not None:
            x = (x.to(scale_in.dtype) * scale_in).to(x.dtype)
        result = self.base_layer(x, *args, **kwargs)
        if scale_out is not None:
            result = (result * scale_out).to(result.dtype)
        return result

    # ------------------------------------------------------------------ merging
    def _weight_factor(self, adapter_name: str) -> torch.Tensor:
        """``l`` shaped to broadcast over the base weight in its own layout."""
        vector = self.ia3_l[adapter_name].detach().flatten()
        along_in = self.is_feedforward[adapter_name]
        # Linear weight is (out, in), Conv1D's is (in, out)
        in_is_rows = self.is_conv1d
        if along_in == in_is_rows:
            return vector[:, None]
        return vector[None, :]

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """``W_merged - W`` for the current weight (the bias, scaled too for output vectors, is not included)."""
        weight = self.base_layer.weight
        return weight * (self._weight_factor(adapter_name).to(weight.dtype) - 1)

    def merge(self, adapter_names: Iterable[str] | None = None) -> None:
        """Multiply the active (or given) adapters' vectors into the base weight (and bias), once each."""
        names = self.active_adapters if adapter_names is None else list(adapter_names)
        held = set(self.adapter_names)
        base = self.base_layer
        for name in names:
            if name not in held or name in self.merged_adapters:
                continue
            refuse_quantized_merge(base, "IA3")
            weight, bias = base.weight, getattr(base, "bias", None)
            scales_bias = not self.is_feedforward[name] and isinstance(bias, torch.Tensor)
            with torch.no_grad():
                if bool((self.ia3_l[name] == 0).any()):
                    self._merge_snapshots[name] = (
                        weight.detach().clone(),
                        bias.detach().clone() if scales_bias else None,
                    )
                weight.mul_(self._weight_factor(name).to(weight.dtype))
                if scales_bias:
                    bias.mul_(self.ia3_l[name].detach().flatten().to(bias.dtype))
            self.merged_adapters.append(name)
        self._refresh()

    def unmerge(self) -> None:
        """Divide every merged vector out again (most recent first)."""
        base = self.base_layer
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            weight, bias = base.weight, getattr(base, "bias", None)
            scales_bias = not self.is_feedforward[name] and isinstance(bias, torch.Tensor)
            with torch.no_grad():
                snapshot = self._merge_snapshots.pop(name, None)
                if snapshot is not None:
                    weight.copy_(snapshot[0])
                    if scales_bias and snapshot[1] is not None:
                        bias.copy_(snapshot[1])
                    continue
                weight.div_(self._weight_factor(name).to(weight.dtype))
                if scales_bias:
                    bias.div_(self.ia3_l[name].detach().flatten().to(bias.dtype))
        self._refresh()

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        self._merge_snapshots.pop(adapter_name, None)
