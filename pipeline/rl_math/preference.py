"""Offline preference losses: the reward model's Bradley-Terry loss and DPO with its variants."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Mean ``-log sigmoid(r_chosen - r_rejected)``: the pairwise loss of a reward model."""
    return -F.logsigmoid(chosen - rejected).mean()


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
