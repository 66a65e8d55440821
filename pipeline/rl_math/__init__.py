"""The arithmetic of preference and policy optimisation, as small pure tensor functions.

Everything here is stateless torch on tensors (the KL controllers hold one float), so each
formula is unit-tested against a hand-written reference and the stage loops only wire them up.
One module per idea, each stating its formulas:

* ``masked``: masked mean / variance / whitening;
* ``tokens``: last real position, per-token log-probs, entropy;
* ``preference``: the reward model's Bradley-Terry loss, DPO and its variants;
* ``kl``: the k1/k3 KL estimators, the KL penalty of a loss, PPO's KL controllers;
* ``ppo``: KL-shaped rewards, GAE, the clipped policy and value losses of PPO with a critic;
* ``score_norm``: running moments that centre and scale the reward model's scores for PPO;
* ``group_advantages``: critic-free advantages (GRPO, Dr. GRPO, RLOO, REINFORCE++) and the
  zero-variance group filter, with the layout contract of a batch of groups;
* ``surrogate``: the critic-free clipped loss (clip-higher, sequence / token / constant
  normalisation, KL term).

Conventions: per-token tensors are ``[batch, T]`` in *response order* (column ``t`` is the
``t``-th generated token of a row) with a 0/1 ``mask`` that is a prefix of ones per row;
masked-out positions never influence a result. Log-probabilities are natural logs.
"""

from raypeft.pipeline.rl_math.group_advantages import (
    GROUP_ESTIMATORS,
    GroupFilter,
    discounted_returns,
    dr_grpo_advantages,
    filter_groups,
    flat_groups,
    group_std,
    grouped,
    grpo_advantages,
    reinforce_pp_advantages,
    rloo_advantages,
)
from raypeft.pipeline.rl_math.kl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, KLPenalty, kl_k1, kl_k3
from raypeft.pipeline.rl_math.ppo import (PolicyLossOut, clipped_policy_loss, clipped_value_loss, explained_variance,
                                          gae, kl_penalised_rewards)
from raypeft.pipeline.rl_math.score_norm import RunningMoments
from raypeft.pipeline.rl_math.preference import DPO_LOSSES, bradley_terry_loss, dpo_loss
from raypeft.pipeline.rl_math.masked import masked_mean, masked_var, masked_whiten
from raypeft.pipeline.rl_math.surrogate import (LOSS_NORMALISATIONS, SurrogateOut, aggregate_token_loss,
                                                clipped_surrogate_loss)
from raypeft.pipeline.rl_math.tokens import entropy_from_logits, last_token_index, token_logprobs

__all__ = [
    "DPO_LOSSES", "GROUP_ESTIMATORS", "KL_ESTIMATORS", "LOSS_NORMALISATIONS", "AdaptiveKLController",
    "FixedKLController", "GroupFilter", "KLPenalty", "PolicyLossOut", "RunningMoments", "SurrogateOut", "aggregate_token_loss",
    "bradley_terry_loss", "clipped_policy_loss", "clipped_surrogate_loss", "clipped_value_loss", "discounted_returns",
    "dpo_loss", "dr_grpo_advantages", "entropy_from_logits", "explained_variance", "filter_groups", "flat_groups", "gae", "group_std",
    "grouped", "grpo_advantages", "kl_k1", "kl_k3", "kl_penalised_rewards", "last_token_index", "masked_mean",
    "masked_var", "masked_whiten", "reinforce_pp_advantages", "rloo_advantages", "token_logprobs",
]
