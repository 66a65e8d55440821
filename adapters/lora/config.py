"""``LoraConfig``: LoRA's (and DoRA's) hyper-parameters with PEFT's names, and its layer factory.

The factory picks the wrapper by base module type: ``nn.Embedding`` -> :class:`LoraEmbedding`,
``nn.Linear`` (bitsandbytes' quantized Linear included) and GPT-2's ``Conv1D`` -> :class:`LoraLinear`.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn
from transformers.pytorch_utils import Conv1D

from .. import quantization as quant
from ..config import AdapterConfig, register_config
from ..constraints import param
from ..layer import AdapterLayer
from ..layer_utils import pattern_value
from .embedding import LoraEmbedding
from .layer import LoraLayer
from .linear import LoraLinear

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

    r: int = param(8, gt=0)
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    lora_alpha: float = param(8, gt=0)
    lora_dropout: float = param(0.0, ge=0.0, lt=1.0)
    fan_in_fan_out: bool = False
    bias: str = param("none", choices=_BIAS_CHOICES)
    use_rslora: bool = False
    modules_to_save: list[str] | None = None
    init_lora_weights: bool | str = param(True, choices=_INIT_CHOICES)
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_dora: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.use_dora, bool):
            raise ValueError(f"LoraConfig: use_dora must be true or false, got {self.use_dora!r}")
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
        return int(pattern_value(self.rank_pattern, module_name, self.r))

    def alpha_for(self, module_name: str) -> float:
        return float(pattern_value(self.alpha_pattern, module_name, self.lora_alpha))

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

