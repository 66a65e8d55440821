"""Small helpers shared by the weight-space methods (LoRA, IA3, LoHa, LoKr, AdaLoRA).

They answer the questions every wrapper of a Linear-like base asks -- is it GPT-2's transposed
``Conv1D``, what are its input and output widths, in which device and dtype must adapter tensors
live, which ``rank_pattern`` entry applies to a module -- so that each method module only holds
its own math.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from . import quantization as quant


def is_conv1d(module: nn.Module) -> bool:
    """``True`` for ``transformers``' ``Conv1D`` (a Linear whose weight is stored transposed)."""
    return isinstance(module, Conv1D)


def is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear`` (bitsandbytes' quantized Linear included) or GPT-2 ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a Linear or Conv1D base (read from attributes, which
    survive DeepSpeed ZeRO-3 partitioning and 4-bit packing, unlike the weight's shape)."""
    if is_conv1d(module):
        return int(module.nx), int(module.nf)  # type: ignore[arg-type]
    return int(module.in_features), int(module.out_features)  # type: ignore[arg-type]


def require_linear_like(module: nn.Module, module_name: str, method: str) -> None:
    """Raise ``TypeError`` naming the module when ``method`` cannot wrap it."""
    if not is_linear_like(module):
        raise TypeError(
            f"{method} cannot wrap {module_name!r} of type {type(module).__name__}; "
            "supported: Linear, Conv1D, bitsandbytes Linear4bit/Linear8bitLt"
        )


def adapter_factory_kwargs(base: nn.Module) -> dict[str, Any]:
    """Adapter tensors live on the base weight's device, in its dtype when that is floating point,
    or in the compute dtype of a quantized base."""
    weight = base.weight  # type: ignore[union-attr]
    if quant.is_quantized(base):
        return {"device": weight.device, "dtype": quant.compute_dtype(base)}
    dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
    return {"device": weight.device, "dtype": dtype}


def refuse_quantized_merge(base: nn.Module, method: str) -> None:
    """Merging writes into the dense weight; a bitsandbytes base has none to write into."""
    if quant.is_quantized(base):
        raise ValueError(
            f"{method} adapters cannot be merged into a quantized (bitsandbytes) base layer; "
            "keep them unmerged or load the base unquantized to merge"
        )


def pattern_value(patterns: dict[str, Any] | None, module_name: str, default: Any) -> Any:
    """PEFT's ``rank_pattern``/``alpha_pattern`` lookup: the first key whose regex matches the end
    of ``module_name`` (on a ``.`` boundary), else ``default``."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module_name):
            return value
    return default


def sorted_list(value: Any) -> Any:
    """Sets and tuples of module names as a sorted list (JSON-ready); anything else unchanged."""
    if isinstance(value, (set, frozenset, tuple)):
        return sorted(value)
    return value


def freeze_unless_active(layer: Any, adapter_name: str, tensors: Iterable[torch.Tensor]) -> None:
    """A new adapter is inactive and frozen until ``set_adapter`` (as in PEFT)."""
    if adapter_name not in layer.active_adapters:
        for tensor in tensors:
            tensor.requires_grad_(False)


def positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_probability(owner: str, name: str, value: Any) -> float:
    """``value`` as a float in ``[0, 1)`` or a one-line ``ValueError`` naming the field."""
    try:
        p = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: {name} must be a number in [0, 1), got {value!r}") from None
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{owner}: {name} must be in [0, 1), got {value!r}")
    return p
