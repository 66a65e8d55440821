"""Reward-model scores normalised to zero mean and unit variance over the run's rollouts.

Why PPO needs it: the critic starts as a zero value head, so ``V = 0`` and GAE gives token ``t``
of a ``T``-token response ``A_t = (gamma * lam)^(T-1-t) * score`` (KL terms aside). A reward
model's scores are not centred (the demo's seeds score their SFT policy's samples at +3 or +7
on average), and whitening the advantages over the batch's tokens does not remove the mean's
share: it becomes a ramp over positions, the same for every response, that pushes the first
tokens of every sample down and the last ones up whatever the sample's score. On the demo this
raised the policy's entropy at the first tokens and lowered the held-out reward on the two seeds
whose mean score was large (7.05 -> 6.81 over five sampling seeds on seed 2). Ziegler et al.
(2019, "Fine-Tuning Language Models from Human Preferences") normalise the reward model to zero
mean and unit variance on the initial policy's samples for the same reason; here the moments run
over every rollout so far (all workers), so they need no extra sampling pass and follow the
policy as it moves. With centred scores a zero critic is the right baseline from the first step.

Moments are merged with Chan et al.'s parallel update from a batch's sum, sum of squares and
count: the three numbers one all-reduce gives across workers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class RunningMoments:
    """Mean and (population) variance of every score seen so far."""

    mean: float = 0.0
    var: float = 0.0
    count: float = 0.0

    def update(self, total: float, total_sq: float, n: float) -> None:
        """Merge a batch given as ``sum(x)``, ``sum(x^2)`` and its size ``n``."""
        if n <= 0:
            return
        batch_mean = total / n
        batch_var = max(total_sq / n - batch_mean * batch_mean, 0.0)
        merged = self.count + n
        delta = batch_mean - self.mean
        self.var = (self.count * self.var + n * batch_var + delta * delta * self.count * n / merged) / merged
        self.mean += delta * n / merged
        self.count = merged

    @property
    def std(self) -> float:
        return math.sqrt(self.var)

    def normalise(self, scores: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        """``(scores - mean) / std``; a run whose scores never varied is only centred."""
        std = self.std
        return (scores - self.mean) / (std if std > eps else 1.0)

    def state(self) -> dict[str, float]:
        return {"mean": self.mean, "var": self.var, "count": self.count}

    @classmethod
    def from_state(cls, state: dict[str, float] | None) -> "RunningMoments":
        return cls(**state) if state else cls()
