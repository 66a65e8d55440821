"""DoRA (Liu et al. 2024): the adapted weight as magnitude times direction.

``W' = m * (W + s B A) / ||W + s B A||`` with the norm taken per output feature (the L2 norm of each
row of the ``(out, in)`` matrix, PEFT's "column norm" of the paper's ``(in, out)`` layout) and
detached from the graph, as the paper's section 4.3 and PEFT do. ``m`` starts at that norm, so a
fresh DoRA adapter equals its LoRA counterpart. With ``f = m / norm`` forward adds
``(f - 1) * (W x) + f * s * B A x`` to the base output, which is exactly ``W' x + b`` without
materialising ``W'``; merging adds ``(f - 1) W + f s B A`` to the weight.

Everything here works on ``(out, in)`` views; :class:`~adapters.lora.layer.LoraLayer` supplies them
for Linear, Conv1D and Embedding alike.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Magnitude(nn.Module):
    """DoRA's per-output magnitude, held as ``.weight`` so parameter names match PEFT's
    (``lora_magnitude_vector.<adapter>.weight``); saved as ``<path>.lora_magnitude_vector``."""

    def __init__(self, magnitude: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(magnitude)


def initial_magnitude(weight_oi: torch.Tensor, delta_oi: torch.Tensor) -> torch.Tensor:
    """``m = ||W + s B A||`` per output row: the fresh DoRA adapter computes what LoRA would."""
    return torch.linalg.norm(weight_oi + delta_oi, dim=1)


def dora_factor(magnitude: torch.Tensor, weight_oi: torch.Tensor, delta_oi: torch.Tensor) -> torch.Tensor:
    """``f = m / ||W + s B A||`` per output row, the norm detached (DoRA section 4.3)."""
    with torch.no_grad():
        norm = torch.linalg.norm(weight_oi.detach() + delta_oi.to(weight_oi.dtype), dim=1)
    return magnitude / norm.to(magnitude.dtype)


def output_delta(factor: torch.Tensor, plain: torch.Tensor, lora_out: torch.Tensor) -> torch.Tensor:
    """DoRA's addition to the base output: ``(f - 1) W x + f s B A x`` from ``plain = W x`` and
    ``lora_out = s B A x``."""
    return (factor - 1) * plain + factor * lora_out


def unmerged_weight(weight_oi: torch.Tensor, merged: Sequence[tuple[torch.Tensor, torch.Tensor | None]]) -> torch.Tensor:
    """The base weight before any merge, recovered from the merged one (float32).

    ``merged`` lists, in merge order, each merged adapter's float32 ``s B A`` with its DoRA factor
    (``None`` for plain LoRA). Merged LoRA adapters added ``s B A``; merged DoRA adapters added
    ``(f - 1) W0 + f s B A`` (row-wise ``f``), so ``W = W0 (1 + sum (f - 1)) + sum_lora s B A +
    sum_dora f s B A``. Keeping only the per-row factors (not a copy of ``W0``) is what lets several
    DoRA adapters merge and unmerge in any combination.
    """
    w = weight_oi.float()
    if not merged:
        return w
    w = w.clone()
    denominator: torch.Tensor | None = None
    for delta, factor in merged:
        if factor is None:
            w.sub_(delta)
        else:
            w.sub_(factor[:, None] * delta)
            denominator = factor - 1 if denominator is None else denominator + (factor - 1)
    if denominator is not None:
        w.div_((1 + denominator)[:, None])
    return w


def merge_factor(magnitude: torch.Tensor, base_oi: torch.Tensor, delta_oi: torch.Tensor) -> torch.Tensor:
    """The factor a merge uses: the norm forward uses, of the unmerged weight (float32)."""
    return magnitude / torch.linalg.norm(base_oi + delta_oi, dim=1)


def merge_delta(factor: torch.Tensor, base_oi: torch.Tensor, delta_oi: torch.Tensor) -> torch.Tensor:
    """``W' - W0 = (f - 1) W0 + f s B A`` -- additive, so adapters merged together give exactly the
    forward of those adapters active together."""
    return (factor - 1)[:, None] * base_oi + factor[:, None] * delta_oi
