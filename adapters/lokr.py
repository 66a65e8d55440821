"""LoKr (Kronecker-product adaptation, LyCORIS; Edalati et al. 2022 KronA): ``dW = (w1 kron w2) * alpha / r``.

Both widths are factored, ``out = a * c`` and ``in = b * d`` (:func:`factorization`, PEFT's rule, so
that tensor shapes -- and therefore files -- are the same as PEFT's), and

* ``w1`` is ``(a, b)``: a full matrix, or ``w1_a @ w1_b`` (``(a, r) @ (r, b)``) when
  ``decompose_both`` is set and ``r < max(a, b) / 2``;
* ``w2`` is ``(c, d)``: a full matrix when ``r >= max(c, d) / 2``, else ``w2_a @ w2_b``.

``torch.kron(w1, w2)`` is ``(a c, b d) = (out, in)``. With ``decompose_factor = f > 0`` dividing a
width, the first factor of that width is ``f``; otherwise the split is the most balanced divisor pair.
Initialisation as in PEFT: ``init_weights=True`` zeroes ``w1`` (or ``w1_a``), ``"lycoris"`` zeroes
``w2`` (or ``w2_b``) instead, ``False`` randomises everything (a non-zero update, for tests).

Saved keys (PEFT's): ``base_model.model.<module path>.lokr_w1`` or ``lokr_w1_a``/``lokr_w1_b``, and
``lokr_w2`` or ``lokr_w2_a``/``lokr_w2_b``. As for LoHa, GPT-2 ``Conv1D`` is wrapped here too (PEFT
cannot load those files).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .config import register_config
from .constraints import param
from .lycoris import LycorisConfig, LycorisLayer

_INIT_CHOICES = (True, False, "lycoris")


def _balanced_or_positive(factor: object) -> str | None:
    """``decompose_factor``: ``-1`` asks for the balanced split, a positive integer for that factor."""
    if isinstance(factor, bool) or not isinstance(factor, int) or (factor <= 0 and factor != -1):
        return "must be -1 (balanced) or a positive integer"
    return None


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into ``(m, n)`` with ``m * n == dimension`` the way PEFT's LoKr does.

    * ``factor > 0`` dividing ``dimension``: ``(factor, dimension // factor)``, as given;
    * otherwise walk the divisors ``m`` of ``dimension`` upwards (never past ``factor``, or past
      ``dimension`` when ``factor == -1``) while ``m`` is still below its co-factor, and return the
      last pair reached, smaller first: ``128 -> (8, 16)``, ``36 -> (6, 6)``, a prime ``p -> (1, p)``,
      ``factorization(128, 6) -> (4, 32)``.
    """
    if dimension <= 0:
        raise ValueError(f"factorization: dimension must be positive, got {dimension!r}")
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    for d in _divisors(dimension)[1:]:
        if m >= n or d > limit:
            break
        m, n = d, dimension // d
    return (m, n) if m <= n else (n, m)


@register_config
@dataclass
class LoKrConfig(LycorisConfig):
    """LoKr hyper-parameters (PEFT's ``LoKrConfig`` names and defaults): the LyCORIS fields (``r``,
    ``alpha``, ``rank_dropout``, ``module_dropout``, targeting, ``rank_pattern``/``alpha_pattern``,
    ``modules_to_save``) plus ``decompose_both`` (low-rank ``w1`` too), ``decompose_factor`` (``-1``:
    balanced split) and ``rank_dropout_scale``; ``init_weights`` is ``True``, ``False`` or ``"lycoris"``."""

    PEFT_TYPE: ClassVar[str] = "LOKR"
    ADAPTER_PREFIX: ClassVar[str] = "lokr_"
    METHOD: ClassVar[str] = "LoKr"

    init_weights: bool | str = param(True, choices=_INIT_CHOICES)
    decompose_both: bool = False
    decompose_factor: int = param(-1, check=_balanced_or_positive)
    rank_dropout_scale: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.init_weights, (bool, str)):
            raise ValueError(f"LoKrConfig: init_weights must be one of {_INIT_CHOICES}, got {self.init_weights!r}")
        for name in ("decompose_both", "rank_dropout_scale"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"LoKrConfig: {name} must be true or false, got {getattr(self, name)!r}")

    def layer_class(self) -> type[LycorisLayer]:
        return LoKrLayer


def _kaiming(tensor: torch.Tensor) -> None:
    nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


class LoKrLayer(LycorisLayer):
    """LoKr around ``nn.Linear`` (bitsandbytes' quantized Linear included) or GPT-2 ``Conv1D``.

    Each adapter holds either the full factor (``lokr_w1``/``lokr_w2``) or its two low-rank parts.
    """

    adapter_layer_names: ClassVar[tuple[str, ...]] = (
        "lokr_w1",
        "lokr_w1_a",
        "lokr_w1_b",
        "lokr_w2",
        "lokr_w2_a",
        "lokr_w2_b",
    )

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict())

    def kron_shapes(self, factor: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """``((a, b), (c, d))``: ``w1`` is ``(a, b)``, ``w2`` is ``(c, d)``; ``a c = out``, ``b d = in``."""
        out_a, out_c = factorization(self.out_features, factor)
        in_b, in_d = factorization(self.in_features, factor)
        return (out_a, in_b), (out_c, in_d)

    def _create_tensors(self, adapter_name: str, config: LycorisConfig, r: int, factory: dict[str, Any]) -> None:
        assert isinstance(config, LoKrConfig)
        (a, b), (c, d) = self.kron_shapes(config.decompose_factor)
        full_w1 = not (config.decompose_both and r < max(a, b) / 2)
        full_w2 = not (r < max(c, d) / 2)
        init = config.init_weights
        tensors: dict[str, torch.Tensor] = {}
        if full_w1:
            tensors["lokr_w1"] = torch.empty(a, b, **factory)
        else:
            tensors["lokr_w1_a"] = torch.empty(a, r, **factory)
            tensors["lokr_w1_b"] = torch.empty(r, b, **factory)
        if full_w2:
            tensors["lokr_w2"] = torch.empty(c, d, **factory)
        else:
            tensors["lokr_w2_a"] = torch.empty(c, r, **factory)
            tensors["lokr_w2_b"] = torch.empty(r, d, **factory)
        for tensor in tensors.values():
            _kaiming(tensor)
        # one zero factor makes dW = 0: w1 (or its first part) by default, w2 (its second part) LyCORIS-style
        zero = {True: ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b")}.get(init, ())  # type: ignore[call-overload]
        for name in zero:
            if name in tensors:
                nn.init.zeros_(tensors[name])
        for name, tensor in tensors.items():
            getattr(self, name)[adapter_name] = nn.Parameter(tensor)

    def _factor(self, adapter_name: str, which: str) -> torch.Tensor:
        full = getattr(self, f"lokr_{which}")
        if adapter_name in full:
            return full[adapter_name]
        return getattr(self, f"lokr_{which}_a")[adapter_name] @ getattr(self, f"lokr_{which}_b")[adapter_name]

    def _raw_delta_oi(self, adapter_name: str) -> torch.Tensor:
        return torch.kron(self._factor(adapter_name, "w1"), self._factor(adapter_name, "w2"))
