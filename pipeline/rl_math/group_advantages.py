"""Critic-free advantages: the other completions of the same prompt are the baseline.

Layout contract. Each prompt is sampled ``G = num_generations`` times; the per-completion
rewards are one flat tensor ``[num_prompts * G]`` ordered group by group: rows ``p*G .. p*G+G-1``
are the completions of prompt ``p`` (so ``rewards.view(num_prompts, G)`` puts one group per
row). A group is the unit of every statistic here, so a batch split across workers or
minibatches must be cut at group boundaries; every function checks that the length is a multiple
of ``G`` and keeps the order it was given.

For one group with rewards ``r_1..r_G``, ``mean`` and ``std`` over that group (``std``
Bessel-corrected, as ``torch.std``):

* GRPO (Shao et al. 2024):     ``A_i = (r_i - mean) / (std + eps)``
* Dr. GRPO (Liu et al. 2025):  ``A_i = r_i - mean`` (dividing by ``std`` up-weights groups whose
  rewards barely differ, i.e. questions that are too easy or too hard)
* RLOO (Ahmadian et al. 2024): ``A_i = r_i - (sum_{j != i} r_j) / (G - 1) = G / (G - 1) * (r_i - mean)``:
  the baseline is the mean of the *other* samples, so it does not depend on ``r_i``

A group whose rewards are all equal carries no signal: these three give it exactly 0 (not a
rounding residue divided by ``eps``), and ``filter_groups`` can drop it from the batch.
These are sequence-level advantages ``[N]``; a loss broadcasts them over a row's tokens.

REINFORCE++ (Hu 2025) has no group: per-token rewards ``-beta * KL_t`` plus the score on the last
token, the return ``G_t = sum_{s >= t} gamma^(s-t) r_s``, whitened over every response token of
the batch (``(G_t - mean) / (std + eps)``, population std, as in OpenRLHF's batch normalisation). With
``num_generations`` the group mean is subtracted from the scores first (REINFORCE++-baseline).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from raypeft.pipeline.rl_math.masked import masked_mean, masked_var


def grouped(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """``rewards [P * G]`` as ``[P, G]``, one group per row (see the layout contract above)."""
    if num_generations < 1:
        raise ValueError(f"num_generations must be >= 1, got {num_generations}")
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards must be one flat tensor of whole groups of {num_generations}, got shape "
                         f"{tuple(rewards.shape)}")
    return rewards.view(-1, num_generations)


def flat_groups(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """``[P]`` bool: the groups whose rewards are all equal (zero variance, no learning signal)."""
    g = grouped(rewards, num_generations)
    return g.amax(dim=1) == g.amin(dim=1)


def group_std(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """``[P]`` the reward std within each group (0 for a group of one); logged as a health signal."""
    g = grouped(rewards, num_generations)
    if num_generations == 1:
        return torch.zeros_like(g[:, 0])
    return g.std(dim=1)


def _centred(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """``[P, G]`` ``r_i - mean`` of the group, exactly 0 in flat groups."""
    g = grouped(rewards, num_generations)
    flat = (g.amax(dim=1) == g.amin(dim=1)).unsqueeze(1)
    return torch.where(flat, torch.zeros_like(g), g - g.mean(dim=1, keepdim=True))


def grpo_advantages(rewards: torch.Tensor, num_generations: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: ``(r_i - mean) / (std + eps)`` within each group; ``[N] -> [N]``."""
    return (_centred(rewards, num_generations) / (group_std(rewards, num_generations).unsqueeze(1) + eps)).view(-1)


def dr_grpo_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """Dr. GRPO: ``r_i - mean`` within each group, no std normalisation; ``[N] -> [N]``."""
    return _centred(rewards, num_generations).view(-1)


def rloo_advantages(rewards: torch.Tensor, num_generations: int) -> torch.Tensor:
    """RLOO: ``r_i - mean_{j != i} r_j`` within each group (needs ``G >= 2``); ``[N] -> [N]``."""
    if num_generations < 2:
        raise ValueError(f"rloo needs num_generations >= 2 (a leave-one-out baseline), got {num_generations}")
    scale = num_generations / (num_generations - 1)
    return (scale * _centred(rewards, num_generations)).view(-1)


# The estimators whose advantage is one number per completion, by the name a config selects.
GROUP_ESTIMATORS: dict[str, Callable[[torch.Tensor, int], torch.Tensor]] = {
    "grpo": grpo_advantages,
    "dr_grpo": dr_grpo_advantages,
    "rloo": rloo_advantages,
}


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """``G_t = sum_{s >= t} gamma^(s-t) r_s`` over each row's response tokens; zero outside ``mask``."""
    mask = mask.to(rewards.dtype)
    rewards = rewards * mask
    returns = torch.zeros_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running
        returns[:, t] = running
    return returns * mask


def reinforce_pp_advantages(scores: torch.Tensor, mask: torch.Tensor, *, kl: torch.Tensor | None = None,
                            kl_coef: float = 0.0, gamma: float = 1.0, num_generations: int | None = None,
                            eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++: globally whitened returns of KL-shaped per-token rewards; returns ``(advantages, returns)``.

    ``scores [B]`` one reward per completion, ``mask [B, T]`` its response tokens, ``kl [B, T]``
    an optional per-token KL estimate to the reference (``kl_coef * kl`` is subtracted from each
    token's reward). With ``num_generations`` the scores are first centred within each group.
    Both outputs are ``[B, T]`` and zero outside ``mask``.
    """
    mask = mask.to(scores.dtype)
    if num_generations is not None:
        scores = _centred(scores, num_generations).view(-1)
    rewards = torch.zeros_like(mask)
    if kl is not None and kl_coef:
        rewards = rewards - kl_coef * kl * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores
    returns = discounted_returns(rewards, mask, gamma)
    tokens = returns[mask.bool()]
    if tokens.numel() == 0 or bool(tokens.amax() == tokens.amin()):
        # A constant batch has no signal; whitening would blow its mean's rounding residue up to O(1).
        return torch.zeros_like(returns), returns
    mean = masked_mean(returns, mask)
    std = masked_var(returns, mask, unbiased=False).sqrt()
    return (returns - mean) / (std + eps) * mask, returns


@dataclass(frozen=True)
class GroupFilter:
    """Which groups a step keeps; ``keep_rows`` indexes ``[N]`` tensors and keeps groups whole."""

    keep_groups: torch.Tensor  # [P] bool
    keep_rows: torch.Tensor  # [P * G] bool
    zero_variance_fraction: float  # of all groups, for logging
    skipped_fraction: float  # of all groups: a completion had no reward (``valid`` False)


def filter_groups(rewards: torch.Tensor, num_generations: int, *, drop_zero_variance: bool = True,
                  valid: torch.Tensor | None = None) -> GroupFilter:
    """Drop groups with equal rewards (DAPO's dynamic-sampling filter) and groups with an unscored completion.

    ``valid [N]`` (bool) marks completions that got a reward; a group with any invalid member is
    dropped, as its baseline would be computed from fewer samples than the others'. The fractions
    count groups (a group both flat and incomplete counts as skipped).
    """
    g = grouped(rewards, num_generations)
    complete = torch.ones(g.shape[0], dtype=torch.bool, device=rewards.device)
    if valid is not None:
        complete = grouped(valid.to(torch.bool), num_generations).all(dim=1)
    # Invalid rewards may be NaN placeholders: only complete groups are tested for flatness.
    scored = torch.where(complete.unsqueeze(1), g, torch.zeros_like(g))
    flat = complete & (scored.amax(dim=1) == scored.amin(dim=1))
    keep = complete & ~flat if drop_zero_variance else complete
    n = max(g.shape[0], 1)
    return GroupFilter(keep_groups=keep, keep_rows=keep.repeat_interleave(num_generations),
                       zero_variance_fraction=float(flat.sum()) / n, skipped_fraction=float((~complete).sum()) / n)
