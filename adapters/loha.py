"""LoHa (Hyeon-Woo et al., FedPara 2022; LyCORIS): a Hadamard product of two low-rank products.

    ``dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r``

with ``w1_a, w2_a`` of shape ``(out, r)`` and ``w1_b, w2_b`` of shape ``(r, in)``. The element-wise
product of two rank-``r`` matrices has rank up to ``r^2``, so LoHa reaches higher-rank updates than
LoRA with the same ``2 r (in + out)`` parameters. Initialisation as in PEFT: ``w2_b`` is zero (the
model starts unchanged), the other three are Kaiming-uniform; ``init_weights=False`` randomises all
four (a non-zero update, for tests).

Saved keys (PEFT's): ``base_model.model.<module path>.hada_w1_a`` / ``hada_w1_b`` / ``hada_w2_a`` /
``hada_w2_b`` (no ``.weight``). PEFT adapts ``nn.Linear`` only among Linear-like layers; this
library also wraps GPT-2's ``Conv1D`` (factors in the same ``(out, in)`` orientation), whose files
PEFT cannot load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .config import register_config
from .lycoris import LycorisConfig, LycorisLayer


@register_config
@dataclass
class LoHaConfig(LycorisConfig):
    """LoHa hyper-parameters (PEFT's ``LoHaConfig`` names and defaults): ``r``, ``alpha``
    (``scaling = alpha / r``), ``rank_dropout``, ``module_dropout``, ``target_modules``,
    ``exclude_modules``, ``layers_to_transform``/``layers_pattern``, ``rank_pattern``/``alpha_pattern``,
    ``modules_to_save`` and ``init_weights`` (``True`` or ``False``)."""

    PEFT_TYPE: ClassVar[str] = "LOHA"
    ADAPTER_PREFIX: ClassVar[str] = "hada_"
    METHOD: ClassVar[str] = "LoHa"

    init_weights: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"LoHaConfig: init_weights must be true or false, got {self.init_weights!r}")

    def layer_class(self) -> type[LycorisLayer]:
        return LoHaLayer


class LoHaLayer(LycorisLayer):
    """LoHa around ``nn.Linear`` (bitsandbytes' quantized Linear included) or GPT-2 ``Conv1D``."""

    adapter_layer_names: ClassVar[tuple[str, ...]] = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
    ALWAYS_SCALE_RANK_DROPOUT: ClassVar[bool] = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.hada_w1_a = nn.ParameterDict()
        self.hada_w1_b = nn.ParameterDict()
        self.hada_w2_a = nn.ParameterDict()
        self.hada_w2_b = nn.ParameterDict()

    def _create_tensors(self, adapter_name: str, config: LycorisConfig, r: int, factory: dict[str, Any]) -> None:
        out_f, in_f = self.out_features, self.in_features
        tensors = {
            "hada_w1_a": torch.empty(out_f, r, **factory),
            "hada_w1_b": torch.empty(r, in_f, **factory),
            "hada_w2_a": torch.empty(out_f, r, **factory),
            "hada_w2_b": torch.empty(r, in_f, **factory),
        }
        for name, tensor in tensors.items():
            nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))
        if config.init_weights:  # one zero factor is enough for dW = 0
            nn.init.zeros_(tensors["hada_w2_b"])
        for name, tensor in tensors.items():
            getattr(self, name)[adapter_name] = nn.Parameter(tensor)

    def _raw_delta_oi(self, adapter_name: str) -> torch.Tensor:
        w1 = self.hada_w1_a[adapter_name] @ self.hada_w1_b[adapter_name]
        w2 = self.hada_w2_a[adapter_name] @ self.hada_w2_b[adapter_name]
        return w1 * w2
