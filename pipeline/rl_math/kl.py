"""KL to the reference policy: per-token estimators, the penalty a loss adds, PPO's coefficient controllers.

The tokens are sampled from the policy ``pi``, so with ``d = log ref - log pi`` of a sampled token
(Schulman, "Approximating KL divergence", 2020):

* ``k1 = -d = log pi - log ref``: unbiased for KL(pi || ref), but negative on some tokens and
  high-variance;
* ``k3 = exp(d) - d - 1``: also unbiased (``E_pi[exp(d)] = 1``), never negative (``e^x >= 1 + x``),
  lower variance; what GRPO adds to its loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KL_ESTIMATORS = ("k1", "k3")


def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token ``log pi - log ref``."""
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Per-token ``exp(ref - logp) - (ref - logp) - 1`` (>= 0)."""
    d = ref_logprobs - logprobs
    return torch.exp(d) - d - 1.0


_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


@dataclass(frozen=True)
class KLPenalty:
    """``coef * k(logp, ref)`` added to each token's loss; ``coef == 0`` switches the term off.

    ``needs_reference`` tells a stage whether it must compute the reference log-probs at all: with
    a zero coefficient it can skip the reference forward pass entirely.
    """

    coef: float
    estimator: str = "k3"

    def __post_init__(self) -> None:
        if self.coef < 0:
            raise ValueError(f"kl.coef: must be >= 0, got {self.coef}")
        if self.estimator not in _ESTIMATORS:
            raise ValueError(f"kl.estimator: unknown estimator {self.estimator!r}; "
                             f"expected one of {', '.join(KL_ESTIMATORS)}")

    @property
    def needs_reference(self) -> bool:
        return self.coef > 0

    def per_token(self, logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
        """The estimator's per-token KL (not yet multiplied by ``coef``)."""
        return _ESTIMATORS[self.estimator](logprobs, ref_logprobs)


# PPO's coefficient schedules (the KL there shapes the reward instead of entering the loss).

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
