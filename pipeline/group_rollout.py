"""Group rollouts of the critic-free stage: each prompt sampled ``G`` times, decoded, scored, in order.

Layout (the contract of ``pipeline.rl_math.group_advantages``): a worker's step takes ``P`` prompt
rows and repeats each ``G = num_generations`` times before sampling, so completion ``n`` answers
prompt ``n // G`` and every per-completion tensor or list here is ``[P * G]`` group by group. A
group never leaves the worker that sampled it, so its baseline needs no collective.

What a reward function sees per completion: the prompt column's text (without the prompt
template), the decoded completion (cut after its first eos, special tokens dropped) and every
other column of the completion's row under the column's name. A learned reward model scores
``template(prompt) + completion`` at its last token, the layout it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from raypeft.pipeline import engine, rollout
from raypeft.pipeline.config import GenerationSpec
from raypeft.pipeline.rewards import RewardFunction, RewardScores, score_completions
from raypeft.pipeline.roles import Roles
from raypeft.pipeline.rollout import Rollout
from raypeft.pipeline.rollout_engine import RolloutEngine


@dataclass
class GroupRollout:
    """One worker's sampled groups; every list is ``[P * G]`` in the layout above."""

    rollout: Rollout
    num_generations: int
    row_ids: list[int]  # the dataset row each completion answers
    prompts: list[str]  # the row's prompt column (no template)
    columns: dict[str, list[Any]]  # the row's other columns, by name
    completions: list[str]  # decoded responses

    @property
    def num_groups(self) -> int:
        return len(self.row_ids) // self.num_generations


def repeat_groups(ids: Sequence[int], num_generations: int) -> list[int]:
    """``[a, b] -> [a, a, b, b]`` for ``G = 2``: each row once per completion, group by group."""
    return [i for i in ids for _ in range(num_generations)]


def decode_completions(ro: Rollout, tokenizer: Any) -> list[str]:
    """Each row's response tokens (up to and with its eos) as text, special tokens dropped."""
    lengths = ro.mask.sum(1).tolist()
    tokens = ro.tokens.cpu().tolist()
    return tokenizer.batch_decode([t[:n] for t, n in zip(tokens, lengths)], skip_special_tokens=True)


def sample_groups(roles: Roles, policy: str, prompt_set: Any, rows: Any, ids: Sequence[int], *,
                  num_generations: int, prompt_column: str, generation: GenerationSpec, tokenizer: Any,
                  collate: Callable[[list[Any]], dict[str, torch.Tensor]], device: torch.device,
                  generate_kwargs: dict[str, Any] | None = None,
                  engine: RolloutEngine | None = None) -> GroupRollout:
    """Sample ``num_generations`` completions of each prompt row ``ids`` with role ``policy``.

    ``prompt_set``: the tokenized prompts (``input_ids`` per row); ``rows``: the same rows with
    their text columns, index for index.
    """
    expanded = repeat_groups(ids, num_generations)
    batch = {k: v.to(device) for k, v in collate([prompt_set[j] for j in expanded]).items()}
    ro = rollout.sample(roles, policy, batch, generation, tokenizer, generate_kwargs, engine)
    picked = rows[expanded]  # {column: [P * G values]}
    prompts = [p if isinstance(p, list) else str(p) for p in picked.pop(prompt_column)]  # chat: the messages
    return GroupRollout(ro, num_generations, expanded, prompts, picked, decode_completions(ro, tokenizer))


def score_tokens(roles: Roles, ro: Rollout, *, chunk: int, temperature: float, policy: str | None,
                 reference: str | None, reward: str | None, chunked: bool = False) -> None:
    """Fill, in place and ``chunk`` rows per forward, only what the update needs: the sampling
    policy's log-probs (``ro.logprobs``; None: the update's first forward is the old policy),
    the reference's (``ro.ref_logprobs``; None: no KL term, no reference forward) and a reward
    model's scores (``ro.scores``; None: programmable rewards only). Per-token figures are zero
    past each response's end. ``chunked``: log-probabilities without full logits
    (``rollout.policy_terms``)."""
    rollout.score_chunks(roles, ro, chunk=chunk, temperature=temperature, chunked=chunked, policy=policy,
                         reference=reference, reward=reward)


def score_rewards(group: GroupRollout, functions: Sequence[RewardFunction], model_scores: torch.Tensor | None = None,
                  model_weight: float = 1.0, model_label: str = "reward_model") -> RewardScores:
    """Every completion's rewards: each function's (``pipeline.rewards``) and the reward model's
    ``model_scores [N]`` (weighted by ``model_weight``, labelled ``model_label``), and their
    weighted total. A completion that no source scored is invalid (total NaN)."""
    n = len(group.completions)
    if functions:
        scores = score_completions(functions, group.prompts, group.completions, group.columns, group.row_ids)
    else:
        scores = RewardScores({}, torch.full((n,), float("nan"), dtype=torch.float64), torch.zeros(n, dtype=torch.bool))
    if model_scores is None:
        return scores
    model = model_scores.detach().double().cpu()
    total = torch.where(scores.valid, scores.total, torch.zeros_like(scores.total)) + model_weight * model
    return RewardScores({**scores.per_function, model_label: model.tolist()}, total, torch.ones(n, dtype=torch.bool))


def gather_rewards(scores: RewardScores) -> RewardScores:
    """Every worker's scores, concatenated in rank order (for whole-batch reward metrics)."""
    parts = engine.all_gather((scores.per_function, scores.total.tolist(), scores.valid.tolist()))
    labels = list(parts[0][0])
    return RewardScores({k: [s for p in parts for s in p[0][k]] for k in labels},
                        torch.tensor([t for p in parts for t in p[1]], dtype=torch.float64),
                        torch.tensor([v for p in parts for v in p[2]], dtype=torch.bool))
