"""Combine LoRA adapters into a new one: ``add_weighted_adapter`` with PEFT's combination types.

Given adapters ``i`` with factors ``A_i`` (``r_i x in``), ``B_i`` (``out x r_i``), scalings ``s_i``
and user weights ``w_i``, the new adapter (scaling 1: ``lora_alpha = r``) holds, per adapted module:

* ``cat``: ``A = [w_1 s_1 A_1; w_2 s_2 A_2; ...]``, ``B = [B_1, B_2, ...]`` -- exactly
  ``sum_i w_i s_i B_i A_i``; rank ``sum r_i``.
* ``svd`` (and ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``): the
  deltas ``D_i = s_i B_i A_i`` are combined (weighted sum, or the TIES / DARE / magnitude-pruning
  merge of them) and truncated to rank ``svd_rank`` (default ``max r_i``) by SVD:
  ``B = U_r diag(S_r)``, ``A = Vh_r``; ``svd_clamp`` clips both to that quantile of their values.
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: the *factors* are
  combined separately, ``A = merge_i(c_i A_i)``, ``B = merge_i(|c_i| B_i)`` with
  ``c_i = sign(w_i s_i) sqrt(|w_i s_i|)`` (an approximation of the weighted delta sum, as in PEFT);
  all ranks must be equal.

TIES: keep the ``density`` fraction of largest-magnitude entries of each task tensor, elect a sign
per entry (``majority_sign_method``: ``"total"`` = sign of the sum, ``"frequency"`` = sign of the
sign count), and average the weighted entries that agree with it. DARE: keep each entry with
probability ``density`` and divide by ``density`` (random: seed ``torch`` for reproducibility), then
sum (``dare_linear``) or TIES-merge (``dare_ties``). The results match ``peft`` 0.21's
``LoraModel.add_weighted_adapter`` (same random draws in the same order for DARE).

Differences from PEFT, on purpose: an existing ``adapter_name`` raises instead of being ignored;
the new adapter's ``target_modules`` are the full names of the modules any input adapter adapts
(their union, as in PEFT, but independent of regex / ``all-linear`` / ``layers_to_transform``);
rsLoRA inputs give a plain-scaled output (PEFT would keep ``use_rslora`` and rescale the merged
factors by ``sqrt(r)``); DoRA adapters are refused (their magnitudes do not combine linearly).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Protocol

import torch
from torch import nn

from .config import AdapterConfig
from .injection import adapter_layers, save_wrappers
from .lora import LoraConfig, LoraLayer


class AdapterModel(Protocol):
    """What combining needs from :class:`adapters.model.AdapterModel` (which calls in here, so this
    module names the methods it uses instead of importing the class)."""

    peft_config: dict[str, AdapterConfig]

    def get_base_model(self) -> nn.Module: ...

    def add_adapter(self, adapter_name: str, config: AdapterConfig) -> None: ...

    def delete_adapter(self, adapter_name: str) -> None: ...

SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
FACTOR_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
COMBINATION_TYPES = ("cat", *SVD_TYPES, *FACTOR_TYPES)
_NEEDS_DENSITY = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
SIGN_METHODS = ("total", "frequency")


# ---------------------------------------------------------------------- merge primitives
def magnitude_prune_tensor(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """Zero all but the ``int(density * numel)`` largest-magnitude entries."""
    if density >= 1:
        return tensor
    k = int(density * tensor.numel())
    mask = torch.zeros(tensor.numel(), dtype=tensor.dtype, device=tensor.device)
    mask[torch.topk(tensor.abs().reshape(-1), k=k).indices] = 1
    return tensor * mask.view_as(tensor)


def random_prune_tensor(tensor: torch.Tensor, density: float) -> torch.Tensor:
    """DARE: keep each entry with probability ``density``, rescaled by ``1 / density``."""
    if density >= 1:
        return tensor
    keep = torch.bernoulli(torch.full_like(tensor, density))
    return tensor * keep / density


def majority_sign_mask(stacked: torch.Tensor, method: str) -> torch.Tensor:
    """Per entry: does task ``i``'s sign agree with the elected sign (ties go to ``+``)?"""
    signs = stacked.sign()
    strength = stacked.sum(dim=0) if method == "total" else signs.sum(dim=0)
    elected = torch.where(strength >= 0, 1.0, -1.0).to(stacked.dtype)
    return signs == elected


def _weighted(stacked: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return stacked * weights.view(-1, *([1] * (stacked.dim() - 1))).to(stacked.dtype)


def merge_task_tensors(
    kind: str,
    tensors: Sequence[torch.Tensor],
    weights: torch.Tensor,
    density: float | None,
    majority_sign_method: str,
) -> torch.Tensor:
    """Combine same-shaped task tensors with one of ``linear``/``ties``/``dare_*``/``magnitude_prune``."""
    if kind in ("ties", "magnitude_prune"):
        tensors = [magnitude_prune_tensor(t, float(density)) for t in tensors]
    elif kind in ("dare_linear", "dare_ties"):
        tensors = [random_prune_tensor(t, float(density)) for t in tensors]
    weighted = _weighted(torch.stack(list(tensors), dim=0), weights)
    if kind in ("ties", "dare_ties"):
        mask = majority_sign_mask(torch.stack(list(tensors), dim=0), majority_sign_method)
        kept = mask.sum(dim=0).clamp(min=1)
        return (weighted * mask).sum(dim=0) / kept
    return weighted.sum(dim=0)


# ---------------------------------------------------------------------- per-layer
def _pair(layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The live ``(A, B)`` of adapter ``name``: ``(r, in)`` and ``(out, r)``."""
    lora_a = getattr(layer, "lora_A", None)
    if lora_a is not None and name in lora_a:
        return lora_a[name].weight, layer.lora_B[name].weight
    emb_a = getattr(layer, "lora_embedding_A", None)
    if emb_a is not None and name in emb_a:
        return emb_a[name], layer.lora_embedding_B[name]
    raise KeyError(f"{type(layer).__name__} holds no LoRA factors for adapter {name!r}")


def _svd_factors(delta: torch.Tensor, rank: int, clamp: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of rank ``rank`` with ``B A`` the best rank-``rank`` approximation of ``delta``."""
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    keep = min(rank, s.shape[0])
    b = u[:, :keep] * s[:keep]
    a = vh[:keep]
    if clamp is not None:
        limit = torch.quantile(torch.cat([b.flatten(), a.flatten()]), clamp)
        b, a = b.clamp(-limit, limit), a.clamp(-limit, limit)
    if keep < rank:  # the module is smaller than the requested rank: pad with zeros
        b = torch.cat([b, b.new_zeros(b.shape[0], rank - keep)], dim=1)
        a = torch.cat([a, a.new_zeros(rank - keep, a.shape[1])], dim=0)
    return a, b


def _combine_layer(
    layer: LoraLayer,
    name: str,
    sources: list[tuple[str, float]],
    kind: str,
    rank: int,
    density: float | None,
    majority_sign_method: str,
    svd_clamp: float | None,
    module_name: str,
) -> None:
    target_a, target_b = _pair(layer, name)
    if kind == "cat":
        a = torch.cat([_pair(layer, n)[0].float() * (w * layer.scaling[n]) for n, w in sources], dim=0)
        b = torch.cat([_pair(layer, n)[1].float() for n, _ in sources], dim=1)
        new_a, new_b = torch.zeros_like(target_a, dtype=torch.float32), torch.zeros_like(target_b, dtype=torch.float32)
        new_a[: a.shape[0]] = a
        new_b[:, : b.shape[1]] = b
    elif kind in SVD_TYPES:
        deltas = []
        for n, _ in sources:
            src_a, src_b = _pair(layer, n)
            deltas.append(src_b.float() @ src_a.float() * layer.scaling[n])
        weights = torch.tensor([w for _, w in sources], dtype=torch.float32, device=deltas[0].device)
        base_kind = "linear" if kind == "svd" else kind[: -len("_svd")]
        delta = merge_task_tensors(base_kind, deltas, weights, density, majority_sign_method)
        new_a, new_b = _svd_factors(delta, rank, svd_clamp)
    else:
        ranks = {n: _pair(layer, n)[0].shape[0] for n, _ in sources}
        if set(ranks.values()) != {rank}:
            raise ValueError(
                f"add_weighted_adapter: combination_type {kind!r} needs equal ranks; at {module_name!r} the ranks are "
                f"{ranks} (expected {rank}); use 'cat' or 'svd'"
            )
        signed = [w * layer.scaling[n] for n, w in sources]
        weights_a = torch.tensor([math.copysign(math.sqrt(abs(c)), c) for c in signed])
        weights_b = torch.tensor([math.sqrt(abs(c)) for c in signed])
        new_a = merge_task_tensors(kind, [_pair(layer, n)[0].float() for n, _ in sources], weights_a, density,
                                   majority_sign_method)
        new_b = merge_task_tensors(kind, [_pair(layer, n)[1].float() for n, _ in sources], weights_b, density,
                                   majority_sign_method)
    with torch.no_grad():
        target_a.copy_(new_a.to(target_a.dtype))
        target_b.copy_(new_b.to(target_b.dtype))


# ---------------------------------------------------------------------- checks
def _max_rank(config: LoraConfig) -> int:
    return max([int(config.r), *(int(v) for v in config.rank_pattern.values())])


def _check_inputs(
    model: AdapterModel,
    adapters: list[str],
    weights: list[float],
    adapter_name: str,
    combination_type: str,
    density: float | None,
    majority_sign_method: str,
) -> None:
    if not adapters:
        raise ValueError("add_weighted_adapter: adapters must name at least one adapter, got []")
    if len(weights) != len(adapters):
        raise ValueError(
            f"add_weighted_adapter: weights must have one entry per adapter ({len(adapters)}), got {len(weights)}"
        )
    if adapter_name in model.peft_config:
        raise ValueError(f"add_weighted_adapter: adapter {adapter_name!r} already exists; pick a new adapter_name")
    if combination_type not in COMBINATION_TYPES:
        raise ValueError(
            f"add_weighted_adapter: combination_type must be one of {COMBINATION_TYPES}, got {combination_type!r}"
        )
    if majority_sign_method not in SIGN_METHODS:
        raise ValueError(
            f"add_weighted_adapter: majority_sign_method must be one of {SIGN_METHODS}, got {majority_sign_method!r}"
        )
    if any(combination_type.startswith(k) for k in _NEEDS_DENSITY) and len(adapters) > 1:
        if density is None or not 0 < float(density) <= 1:
            raise ValueError(
                f"add_weighted_adapter: combination_type {combination_type!r} needs density in (0, 1], got {density!r}"
            )
    for name in adapters:
        if name not in model.peft_config:
            raise ValueError(f"add_weighted_adapter: unknown adapter {name!r}; have {list(model.peft_config)}")
        config = model.peft_config[name]
        if not isinstance(config, LoraConfig):
            raise ValueError(
                f"add_weighted_adapter combines LoRA adapters only; {name!r} is a {type(config).__name__} adapter"
            )
        if config.use_dora:
            raise ValueError(f"add_weighted_adapter: {name!r} is a DoRA adapter; DoRA magnitudes cannot be combined")
    kinds = {type(model.peft_config[n].target_modules) is str and model.peft_config[n].target_modules != "all-linear"
             for n in adapters}
    if len(kinds) > 1:
        raise ValueError(
            "add_weighted_adapter: the adapters' target_modules mix a regex string with module lists; "
            f"got {[model.peft_config[n].target_modules for n in adapters]}"
        )
    root = model.get_base_model()
    for module_name, wrapper in save_wrappers(root):
        owners = [n for n in adapters if n in wrapper.adapter_names]
        if len(owners) > 1:
            raise ValueError(
                f"add_weighted_adapter: adapters {owners} all train a copy of {module_name!r} (modules_to_save); "
                "such copies cannot be combined"
            )


def _new_rank(model: AdapterModel, adapters: list[str], kind: str, svd_rank: int | None) -> int:
    ranks = {n: _max_rank(model.peft_config[n]) for n in adapters}  # type: ignore[arg-type]
    if kind == "cat":
        return sum(ranks.values())
    if kind in SVD_TYPES:
        if svd_rank is not None and (isinstance(svd_rank, bool) or not isinstance(svd_rank, int) or svd_rank <= 0):
            raise ValueError(f"add_weighted_adapter: svd_rank must be a positive integer, got {svd_rank!r}")
        return svd_rank or max(ranks.values())
    if len(set(ranks.values())) != 1:
        raise ValueError(
            f"add_weighted_adapter: combination_type {kind!r} needs adapters of one rank, got ranks {ranks}; "
            "use 'cat' or 'svd'"
        )
    return next(iter(ranks.values()))


# ---------------------------------------------------------------------- entry point
def add_weighted_adapter(
    model: AdapterModel,
    adapters: Sequence[str],
    weights: Sequence[float],
    adapter_name: str,
    combination_type: str = "svd",
    svd_rank: int | None = None,
    density: float | None = None,
    majority_sign_method: str = "total",
    svd_clamp: float | None = None,
) -> list[str]:
    """Add LoRA adapter ``adapter_name`` combining ``adapters`` with ``weights`` (see the module docstring).

    The new adapter is added inactive (``set_adapter`` it to use it). Returns the names of the
    modules it adapts.
    """
    adapters, weights = list(adapters), [float(w) for w in weights]
    _check_inputs(model, adapters, weights, adapter_name, combination_type, density, majority_sign_method)
    kind = "linear" if len(adapters) == 1 else combination_type  # one adapter: a plain rescale (PEFT)
    rank = _new_rank(model, adapters, kind, svd_rank)
    root = model.get_base_model()
    layers = [(n, layer) for n, layer in adapter_layers(root) if any(a in layer.adapter_names for a in adapters)]
    for module_name, layer in layers:
        if not isinstance(layer, LoraLayer):
            raise ValueError(f"add_weighted_adapter: {module_name!r} is a {type(layer).__name__}, not a LoRA layer")
    first: LoraConfig = model.peft_config[adapters[0]]  # type: ignore[assignment]
    config = first.copy(
        r=rank,
        lora_alpha=rank,
        use_rslora=False,
        target_modules=[n for n, _ in layers],
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        rank_pattern={},
        alpha_pattern={},
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")  # Conv1D: already known from the sources
        model.add_adapter(adapter_name, config)
    try:
        for module_name, layer in layers:
            sources = [(a, w) for a, w in zip(adapters, weights) if a in layer.adapter_names]
            _combine_layer(layer, adapter_name, sources, kind, rank, density, majority_sign_method, svd_clamp,
                           module_name)
    except Exception:
        model.delete_adapter(adapter_name)
        raise
    return [n for n, _ in layers]


def combined_delta(layer: nn.Module, adapter_name: str) -> torch.Tensor:
    """``s B A`` of one LoRA adapter in ``(out, in)`` layout (float32), for checks and tests."""
    if not isinstance(layer, LoraLayer):
        raise TypeError(f"expected a LoRA layer, got {type(layer).__name__}")
    a, b = _pair(layer, adapter_name)
    return b.float() @ a.float() * layer.scaling[adapter_name]
