"""PPO with a learned critic: KL-shaped per-token rewards, GAE, clipped policy and value losses."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raypeft.pipeline.rl_math.masked import masked_mean, masked_var


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


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``1 - Var(R - V) / Var(R)`` over the masked tokens: how much of the returns the critic predicts.

    1 is a perfect critic, 0 one no better than a constant (a zero value head), below 0 a critic
    whose errors are larger than the returns' own spread; its values then put noise of that size
    into every ``delta_t = r_t + V_{t+1} - V_t``, and the advantages stop following the score.
    A reward model's head read at prefix tokens (it was trained on the last token only) starts
    there: on the demo, -3.9 on the first rollout (a zero head: 0).
    """
    var_returns = masked_var(returns, mask)
    return 1.0 - masked_var(returns - values, mask) / var_returns.clamp(min=1e-8)


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
