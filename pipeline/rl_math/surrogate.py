"""The critic-free policy loss: a clipped surrogate with separate lower/upper clip ranges, three
ways to normalise it over tokens, and an optional KL term to the reference.

Per token, with ratio ``rho = exp(log pi - log pi_old)`` and advantage ``A``:

    l_t = max(-A rho, -A clip(rho, 1 - clip_low, 1 + clip_high)) + beta * KL_t

``clip_high > clip_low`` is DAPO's clip-higher: a token whose probability is rising may rise
further before the clip stops it, which keeps exploration (entropy) alive. The clipped term wins
on the low side when ``A < 0`` and ``rho < 1 - clip_low``, on the high side when ``A > 0`` and
``rho > 1 + clip_high``; the two fractions are reported apart.

Normalisation over a batch of ``B`` rows with ``|o_i|`` response tokens each:

* ``sequence`` (GRPO):     ``(1/B) sum_i (1/|o_i|) sum_t l_it``: every completion weighs the same, so a
  token of a long completion weighs less (a length bias: long wrong answers are penalised less);
* ``token`` (DAPO):        ``sum_it l_it / sum_i |o_i|``: every token weighs the same;
* ``constant`` (Dr. GRPO): ``sum_it l_it / (B * max_length)`` with ``max_length`` the generation
  budget (``max_new_tokens``): a constant, so neither the length nor the batch's token count
  rescales a completion's gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raypeft.pipeline.rl_math.kl import KLPenalty
from raypeft.pipeline.rl_math.masked import masked_mean

LOSS_NORMALISATIONS = ("sequence", "token", "constant")


def aggregate_token_loss(per_token: torch.Tensor, mask: torch.Tensor, normalisation: str,
                         max_length: int | None = None) -> torch.Tensor:
    """Reduce a ``[B, T]`` per-token loss to a scalar by one of ``LOSS_NORMALISATIONS`` (see above)."""
    mask = mask.to(per_token.dtype)
    if normalisation == "sequence":
        return ((per_token * mask).sum(1) / mask.sum(1).clamp(min=1.0)).mean()
    if normalisation == "token":
        return (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    if normalisation == "constant":
        if max_length is None or max_length <= 0:
            raise ValueError("loss normalisation 'constant' needs max_length > 0 (the generation budget), "
                             f"got {max_length}")
        return (per_token * mask).sum() / (per_token.shape[0] * max_length)
    raise ValueError(f"unknown loss normalisation {normalisation!r}; expected one of {', '.join(LOSS_NORMALISATIONS)}")


@dataclass(frozen=True)
class SurrogateOut:
    loss: torch.Tensor
    clip_fraction_low: torch.Tensor  # tokens where the lower clip bound won
    clip_fraction_high: torch.Tensor  # tokens where the upper clip bound won
    approx_kl: torch.Tensor  # mean((log rho)^2) / 2: how far this update moved from pi_old
    kl: torch.Tensor | None  # mean per-token KL to the reference, None when it was not computed


def clipped_surrogate_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                           mask: torch.Tensor, *, clip_low: float = 0.2, clip_high: float | None = None,
                           normalisation: str = "sequence", max_length: int | None = None,
                           kl_penalty: KLPenalty | None = None,
                           ref_logprobs: torch.Tensor | None = None) -> SurrogateOut:
    """The loss above. ``advantages`` is ``[B, T]`` per token or ``[B]`` per completion (broadcast).

    ``clip_high`` defaults to ``clip_low`` (symmetric PPO clipping). The KL term is added when
    ``kl_penalty.needs_reference``, and then ``ref_logprobs`` is required; with a zero
    coefficient a given ``ref_logprobs`` is only measured (``kl``), never differentiated.
    """
    clip_high = clip_low if clip_high is None else clip_high
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = torch.maximum(unclipped, clipped)
    clipped_won = (clipped > unclipped).float()
    kl_mean = None
    if kl_penalty is not None and kl_penalty.needs_reference:
        if ref_logprobs is None:
            raise ValueError(f"a KL coefficient of {kl_penalty.coef} needs the reference log-probs")
        kl = kl_penalty.per_token(logprobs, ref_logprobs)
        per_token = per_token + kl_penalty.coef * kl
        kl_mean = masked_mean(kl.detach(), mask)
    elif ref_logprobs is not None:
        kl_mean = masked_mean((kl_penalty or KLPenalty(0.0)).per_token(logprobs.detach(), ref_logprobs), mask)
    return SurrogateOut(
        loss=aggregate_token_loss(per_token, mask, normalisation, max_length),
        clip_fraction_low=masked_mean(clipped_won * (ratio < 1.0).float(), mask).detach(),
        clip_fraction_high=masked_mean(clipped_won * (ratio > 1.0).float(), mask).detach(),
        approx_kl=0.5 * masked_mean(log_ratio.detach() ** 2, mask),
        kl=kl_mean,
    )
