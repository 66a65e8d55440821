"""The arithmetic of preference and policy optimisation, as small pure tensor functions.

Everything here is stateless torch on tensors (the KL controllers hold one float), so each
formula is unit-tested against a hand-written reference and the stage loops only wire them up.

Conventions: per-token tensors are ``[batch, T]`` in *response order* (column ``t`` is the
``t``-th generated token of a row) with a 0/1 ``mask`` that is a prefix of ones per row;
masked-out positions never influence a result. Log-probabilities are natural logs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------ masked statistics

def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (over all of them, or along ``dim``)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries of ``x`` (Bessel-corrected unless ``unbiased=False``)."""
    mask = mask.to(x.dtype)
    n = mask.sum()
    mean = (x * mask).sum() / n.clamp(min=1.0)
    var = (((x - mean) ** 2) * mask).sum() / n.clamp(min=1.0)
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Scale the masked entries of ``x`` to unit variance (and zero mean unless ``shift_mean=False``).

    Not shifting keeps the sign of per-token rewards (a penalty stays a penalty) while still
    normalising their scale, which is how reward whitening is usually applied.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


# ------------------------------------------------------------------------------ sequence helpers

def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the last non-padding position of each row (works for left or right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device).expand_as(attention_mask)
    return torch.where(attention_mask.bool(), positions, torch.full_like(positions, -1)).max(dim=1).values


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[..., token]`` for each position (float32 for a stable softmax)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return torch.gather(logp, -1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at each position, in nats."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


# ------------------------------------------------------------------------------ reward model

def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean ``-log sigmoid(r_chosen - r_rejected)``: the pairwise loss of a reward model."""
    return -F.logsigmoid(chosen - rejected).mean()


# ------------------------------------------------------------------------------ DPO

DPO_LOSSES = ("sigmoid", "ipo", "hinge")


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, *, beta: float, loss_type: str = "sigmoid",
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses and the implicit rewards ``beta * (log pi - log ref)`` of each side.

    Inputs are sequence log-probabilities of the responses (for ``ipo`` the callers pass the
    per-token average, as the IPO paper's objective is on length-normalised log-ratios).
    ``h = (pi_c - ref_c) - (pi_r - ref_r)``;

    * ``sigmoid`` (DPO): ``-log sigmoid(beta * h)``
    * ``ipo``:           ``(h - 1 / (2 beta))^2``
    * ``hinge`` (SLiC):  ``max(0, 1 - beta * h)``
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * h)
    else:
        raise ValueError(f"dpo.loss_type: unknown loss {loss_type!r}; expected one of {', '.join(DPO_LOSSES)}")
    return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# ------------------------------------------------------------------------------ PPO

def kl_penalised_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                         mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: ``-kl_coef * (log pi - log ref)`` everywhere, plus the score on the last token.

    Returns ``(rewards, kl)`` where ``kl`` is the per-token estimate ``log pi - log ref`` of the
    sampled tokens (zero outside ``mask``); its row sum estimates KL(pi || ref) of the sequence.
    """
    mask = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards = rewards.clone()
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards * mask, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each row's response tokens.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` with ``V`` zero after the last token (the episode
    ends there), ``A_t = delta_t + gamma * lam * A_{t+1}``; returns ``(advantages, returns)``
    with ``returns = advantages + values``, both zero outside ``mask``.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    steps = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        advantages[:, t] = running
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


@dataclass(frozen=True)
class PolicyLossOut:
    loss: torch.Tensor
    clip_fraction: torch.Tensor
    approx_kl: torch.Tensor


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, cliprange: float) -> PolicyLossOut:
    """PPO's clipped surrogate: mean of ``max(-A r, -A clip(r, 1-eps, 1+eps))``, ``r = pi / pi_old``.

    Also the fraction of tokens where the clipped term won, and ``approx_kl = mean((log r)^2) / 2``
    (a low-variance estimate of KL(pi_old || pi) for small steps).
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clip_fraction = masked_mean((clipped > unclipped).float(), mask)
    approx_kl = 0.5 * masked_mean(log_ratio.detach() ** 2, mask)
    return PolicyLossOut(loss, clip_fraction.detach(), approx_kl)


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                       mask: torch.Tensor, cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``0.5 * mean(max((V - R)^2, (V_clip - R)^2))`` with ``V_clip`` kept within ``cliprange_value``
    of the rollout's value; returns ``(loss, fraction of tokens where the clipped term won)``."""
    clipped_values = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    plain = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(plain, clipped), mask)
    return loss, masked_mean((clipped > plain).float(), mask).detach()


# ------------------------------------------------------------------------------ KL controllers

class FixedKLController:
    """A constant KL coefficient."""

    def __init__(self, coef: float) -> None:
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value


class AdaptiveKLController:
    """Ziegler et al. (2019): move the coefficient so the observed KL tracks ``target``.

    ``e = clip(KL / target - 1, -0.2, 0.2)``; ``coef *= 1 + e * n_steps / horizon``, where
    ``n_steps`` counts the samples (sequences) seen since the last update.
    """

    def __init__(self, coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"adaptive KL needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.value = float(coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
        return self.value
