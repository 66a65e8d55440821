"""Bottleneck adapters (Houlsby et al. 2019; Pfeiffer et al. 2020): a small residual MLP after a sub-layer.

The adapter wraps the output projection of a transformer sub-layer and rewrites its output ``h`` as

    ``h + up(act(down(dropout(h))))``

before the block adds its own residual. ``down`` maps the hidden size to ``bottleneck_size``,
``up`` maps it back and starts at zero (weight and bias), so a fresh adapter leaves the model
unchanged. Placement:

* ``"houlsby"``: after attention *and* after the feed-forward network (two adapters per block);
* ``"pfeiffer"``: after the feed-forward network only.

PEFT has no bottleneck adapters, so the file format is ours but laid out like PEFT's:
``adapter_config.json`` with ``peft_type: "BOTTLENECK"`` and ``adapter_model.safetensors`` with keys
``base_model.model.<module path>.adapter_down.weight`` / ``.bias`` and ``adapter_up.weight`` / ``.bias``.
The non-linearity makes the update impossible to fold into a weight: merging raises.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import AdapterConfig, register_config
from .constraints import FieldRule, param
from .layer import AdapterLayer, UnmergeableAdapterLayer

PLACEMENTS = ("houlsby", "pfeiffer")
NON_LINEARITIES: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU}
DEFAULT_REDUCTION_FACTOR = 16

_LLAMA_LIKE = ("self_attn.o_proj", "mlp.down_proj")
_GPT2 = ("attn.c_proj", "mlp.c_proj")
# model_type -> (after-attention module, after-feed-forward module); mixture-of-experts models have no
# single feed-forward output projection, so they need explicit target_modules
DEFAULT_TARGETS: dict[str, tuple[str, str]] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "gpt2": _GPT2,
}


def bottleneck_tags(values: Mapping[str, Any]) -> dict[str, Any]:
    """Registry tags: the placement and the one width setting in use (the factor 16 when neither is set)."""
    tags: dict[str, Any] = {"placement": values.get("placement")}
    if values.get("bottleneck_size") is not None:
        tags["bottleneck_size"] = values["bottleneck_size"]
    else:
        tags["reduction_factor"] = values.get("reduction_factor") or DEFAULT_REDUCTION_FACTOR
    return tags


@register_config
@dataclass
class BottleneckConfig(AdapterConfig):
    """Bottleneck adapter hyper-parameters.

    ``bottleneck_size`` (the adapter's inner width) or ``reduction_factor`` (inner width = output
    width // factor, at least 1; 16 when neither is given) -- not both. ``target_modules`` defaults
    per architecture and placement: Llama-family ``self_attn.o_proj`` + ``mlp.down_proj`` (houlsby)
    or ``mlp.down_proj`` (pfeiffer); GPT-2 ``attn.c_proj`` + ``mlp.c_proj`` or ``mlp.c_proj``.
    Explicit ``target_modules`` are used as given. ``init_weights=False`` also randomises the
    up-projection (a non-zero adapter, for tests).
    """

    PEFT_TYPE: ClassVar[str] = "BOTTLENECK"
    ADAPTER_PREFIX: ClassVar[str] = "adapter_"
    MERGEABLE: ClassVar[bool] = False

    FIELD_RULES: ClassVar[tuple[FieldRule, ...]] = (
        FieldRule("reduction_factor", ("bottleneck_size",),
                  lambda v, ref: f"set {ref('bottleneck_size')} or {ref('reduction_factor')}, not both"),
    )

    bottleneck_size: int | None = param(None, gt=0)
    reduction_factor: float | None = param(None, gt=0)
    placement: str = param("houlsby", choices=PLACEMENTS)
    non_linearity: str = param("relu", choices=tuple(NON_LINEARITIES))
    adapter_dropout: float = param(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    modules_to_save: list[str] | None = None
    init_weights: bool = True

    def __post_init__(self) -> None:
        self.placement = str(self.placement).lower()
        self.non_linearity = str(self.non_linearity).lower()
        super().__post_init__()
        if self.bottleneck_size is None and self.reduction_factor is None:
            self.reduction_factor = DEFAULT_REDUCTION_FACTOR
        if isinstance(self.target_modules, (set, frozenset, tuple)):
            self.target_modules = sorted(self.target_modules)
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)

    def size_for(self, features: int) -> int:
        """The inner width for an adapter on a module with ``features`` outputs."""
        if self.bottleneck_size is not None:
            return int(self.bottleneck_size)
        return max(1, int(features // float(self.reduction_factor)))

    # ------------------------------------------------------------------ targets
    def default_target_modules(self, model: nn.Module) -> list[str]:
        """The placement's module suffixes for ``model``'s architecture."""
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(
                f"BottleneckConfig: target_modules is not set and there is no default for model_type {model_type!r}; "
                f"defaults exist for {', '.join(sorted(DEFAULT_TARGETS))}"
            )
        after_attention, after_ffn = DEFAULT_TARGETS[model_type]
        return [after_attention, after_ffn] if self.placement == "houlsby" else [after_ffn]

    def find_target_modules(self, model: nn.Module) -> list[str]:
        if not self.target_modules:
            # recorded in the config (as PEFT records resolved defaults) so the saved file is explicit
            self.target_modules = self.default_target_modules(model)
        return super().find_target_modules(model)

    # ------------------------------------------------------------------ layer factory
    def create_layer(self, target: nn.Module, adapter_name: str, module_name: str) -> AdapterLayer:
        if not (isinstance(target, nn.Linear) or isinstance(target, Conv1D)):
            raise TypeError(
                f"bottleneck adapters wrap Linear or Conv1D output projections; {module_name!r} is "
                f"{type(target).__name__}"
            )
        layer = BottleneckLayer(target)
        self.update_layer(layer, adapter_name, module_name)
        return layer

    def update_layer(self, layer: AdapterLayer, adapter_name: str, module_name: str) -> None:
        if not isinstance(layer, BottleneckLayer):
            raise TypeError(f"{module_name!r} is wrapped by {type(layer).__name__}, not a bottleneck adapter layer")
        layer.add_adapter(
            adapter_name,
            size=self.size_for(layer.features),
            non_linearity=self.non_linearity,
            dropout=float(self.adapter_dropout),
            init_weights=bool(self.init_weights),
        )

    def layer_class(self) -> type[AdapterLayer]:
        return BottleneckLayer


class BottleneckLayer(UnmergeableAdapterLayer):
    """A Linear/Conv1D output projection followed by residual bottleneck adapters.

    Several active adapters are applied in sequence (each sees the previous one's output), which
    is how stacked adapters compose.
    """

    adapter_layer_names: ClassVar[tuple[str, ...]] = ("adapter_down", "adapter_up")
    other_param_names: ClassVar[tuple[str, ...]] = ("adapter_act", "adapter_dropout")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.adapter_down = nn.ModuleDict()
        self.adapter_up = nn.ModuleDict()
        self.adapter_act = nn.ModuleDict()
        self.adapter_dropout = nn.ModuleDict()
        is_conv1d = isinstance(base_layer, Conv1D)
        self.features = int(base_layer.nf) if is_conv1d else int(base_layer.out_features)

    def add_adapter(
        self, adapter_name: str, *, size: int, non_linearity: str, dropout: float, init_weights: bool
    ) -> None:
        if adapter_name in self.adapter_names:
            raise ValueError(f"adapter {adapter_name!r} already exists in this layer")
        weight = self.base_layer.weight
        kw: dict[str, Any] = {
            "device": weight.device,
            "dtype": weight.dtype if weight.dtype.is_floating_point else torch.float32,
        }
        down = nn.Linear(self.features, size, **kw)
        up = nn.Linear(size, self.features, **kw)
        if init_weights:  # the model starts unchanged: the adapter adds up(...) == 0
            nn.init.zeros_(up.weight)
            nn.init.zeros_(up.bias)
        self.adapter_down[adapter_name] = down
        self.adapter_up[adapter_name] = up
        self.adapter_act[adapter_name] = NON_LINEARITIES[non_linearity]()
        self.adapter_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        if adapter_name not in self.active_adapters:  # inactive (and frozen) until set_adapter, as in PEFT
            for tensor in self.adapter_tensors(adapter_name).values():
                tensor.requires_grad_(False)
        self._refresh()

    def adapter_delta(self, adapter_name: str, hidden: torch.Tensor) -> torch.Tensor:
        """``up(act(down(dropout(hidden))))`` -- what adapter ``adapter_name`` adds to ``hidden``."""
        down = self.adapter_down[adapter_name]
        h = hidden if hidden.dtype == down.weight.dtype else hidden.to(down.weight.dtype)
        h = self.adapter_dropout[adapter_name](h)
        return self.adapter_up[adapter_name](self.adapter_act[adapter_name](down(h)))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self._routing is not None and not self.disable_adapters:
            return self._grouped_forward(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or not self._forward_adapters:
            return result
        for name in self._forward_adapters:
            result = result + self.adapter_delta(name, result).to(result.dtype)
        return result
