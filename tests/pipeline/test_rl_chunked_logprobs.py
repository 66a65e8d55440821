"""PPO's and GRPO's log-probabilities without full-vocabulary logits (``chunked_loss``) equal the
full-logit ones: scoring, the update's forward with its gradients, and whole update steps.

A tiny Llama in float64 with the stages' roles on one base (a LoRA policy, the bare base as the
reference, a LoRA critic with a value head), a rollout packed from left-padded prompts and sampled
responses of different lengths (one row ends at its first token, one never ends); temperature 0.7,
as a stage divides the logits by it.
"""

from __future__ import annotations

import copy

import pytest
import torch

from raypeft.adapters import LoraConfig
from raypeft.pipeline import group_rollout, rollout
from raypeft.pipeline.backends import TorchBackend
from raypeft.pipeline.config import ConfigError, parse_config
from raypeft.pipeline.roles import Roles
from raypeft.pipeline.stages import grpo, ppo

from test_lm_head_loss import VOCAB, _base

PAD, EOS, TEMPERATURE = 0, 2, 0.7


def _roles() -> Roles:
    roles = Roles(_base().double())
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    roles.add(ppo.POLICY, lora, trainable=True)
    roles.add_base(ppo.REFERENCE)
    roles.add(ppo.CRITIC, lora, trainable=True, value_head="zero")
    roles.primary = ppo.POLICY
    torch.manual_seed(1)
    for p in roles.trainable_parameters():
        torch.nn.init.normal_(p, std=0.05)
    return roles.double().eval()


def _rollout(rows: int = 6) -> rollout.Rollout:
    g = torch.Generator().manual_seed(0)
    lengths = [1, 4, 7, 2, 9, 5][:rows]  # a one-token prompt: its first response token sits at position 1
    width = max(lengths)
    ids = torch.full((rows, width), PAD)
    mask = torch.zeros(rows, width, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[b, width - n:] = 1
    generated = torch.randint(3, VOCAB, (rows, 6), generator=g)
    generated[0, 0] = EOS  # ends at once
    generated[2, 3] = EOS
    return rollout.pack(ids, mask, generated, EOS, PAD)


def _grads(roles: Roles) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in roles.named_parameters() if p.grad is not None}
    roles.zero_grad(set_to_none=True)
    return out


def test_response_labels_sit_where_the_logits_predict_them() -> None:
    ro = _rollout()
    rows = ro.rows(torch.arange(ro.input_ids.shape[0]))
    labels = rollout.response_labels(rows)
    for b in range(labels.shape[0]):
        n = int(ro.mask[b].sum())
        expected = torch.full_like(labels[b], -100)
        expected[ro.index[b, :n] + 1] = ro.tokens[b, :n]
        assert torch.equal(labels[b], expected)
        assert torch.equal(ro.input_ids[b, ro.index[b, :n] + 1], ro.tokens[b, :n])


@pytest.mark.parametrize("role", [ppo.POLICY, ppo.REFERENCE])
def test_policy_terms_and_gradients_equal_the_full_logits(role: str) -> None:
    roles, ro = _roles(), _rollout()
    rows = ro.rows(torch.arange(ro.input_ids.shape[0]))
    m = ro.mask.double()
    got = {}
    for chunked in (False, True):
        logp, entropy = rollout.policy_terms(roles, role, rows, TEMPERATURE, with_entropy=True, chunked=chunked)
        (logp * m).sum().backward() if role == ppo.POLICY else None
        got[chunked] = (logp * m, entropy * m, _grads(roles))
    assert got[True][0].dtype == torch.float64
    torch.testing.assert_close(got[True][0], got[False][0], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(got[True][1], got[False][1], rtol=1e-10, atol=1e-10)
    assert got[True][1].requires_grad is False  # a metric: no graph through the vocabulary for it
    assert got[True][2].keys() == got[False][2].keys()
    assert bool(got[True][2]) == (role == ppo.POLICY)
    for name in got[False][2]:
        torch.testing.assert_close(got[True][2][name], got[False][2][name], rtol=1e-9, atol=1e-12)
    # without entropies: one output, the same log-probabilities
    alone, none = rollout.policy_terms(roles, role, rows, TEMPERATURE, chunked=True)
    assert none is None
    torch.testing.assert_close(alone * m, got[False][0], rtol=1e-10, atol=1e-10)


def test_ppo_policy_and_critic_in_one_call() -> None:
    roles, ro = _roles(), _rollout()
    rows = ro.rows(torch.arange(ro.input_ids.shape[0]))
    m = ro.mask.double()
    got = {}
    for chunked in (False, True):
        logp, entropy, values = ppo.policy_and_critic(roles, rows, TEMPERATURE, chunked)
        ((logp * m).sum() + (values * m).pow(2).sum()).backward()
        got[chunked] = (logp * m, entropy * m, values * m, _grads(roles))
    for i in range(3):
        torch.testing.assert_close(got[True][i], got[False][i], rtol=1e-10, atol=1e-10)
    assert got[True][3].keys() == got[False][3].keys() and any("lora" in n for n in got[True][3])
    for name in got[False][3]:
        torch.testing.assert_close(got[True][3][name], got[False][3][name], rtol=1e-9, atol=1e-12)


def test_scoring_fills_the_same_rollout() -> None:
    roles = _roles()
    roles.add(ppo.REWARD, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), trainable=False,
              value_head="zero")
    roles.double()
    filled = {}
    for chunked in (False, True):
        ro = _rollout()
        rollout.score(roles, ro, chunk=4, temperature=TEMPERATURE, policy=ppo.POLICY, reference=ppo.REFERENCE,
                      reward=ppo.REWARD, critic=ppo.CRITIC, chunked=chunked)
        group = _rollout()
        group_rollout.score_tokens(roles, group, chunk=4, temperature=TEMPERATURE, policy=ppo.POLICY,
                                   reference=ppo.REFERENCE, reward=None, chunked=chunked)
        filled[chunked] = (ro.logprobs, ro.ref_logprobs, ro.values, ro.scores, group.logprobs, group.ref_logprobs)
    for a, b in zip(filled[True], filled[False]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert not torch.equal(filled[True][0], filled[True][1])  # the policy is not the reference


def test_grpo_update_steps_are_the_same() -> None:
    spec = parse_config({"grpo": {"prompts_per_step": 3, "num_generations": 2, "minibatches": 3, "update_epochs": 2,
                                  "learning_rate": 1e-2, "kl": {"coef": 0.1},
                                  "generation": {"temperature": TEMPERATURE},
                                  "rewards": [{"function": "exact_match"}]}}).grpo
    base_roles = _roles()
    out = {}
    for chunked in (False, True):
        roles = copy.deepcopy(base_roles)
        ro = _rollout()
        group_rollout.score_tokens(roles, ro, chunk=6, temperature=TEMPERATURE, policy=grpo.POLICY,
                                   reference=grpo.REFERENCE, reward=None, chunked=chunked)
        ro.advantages = torch.tensor([1.0, -1.0, 0.5, -0.5, 2.0, -2.0], dtype=torch.float64)
        backend = TorchBackend(roles, lr=spec.learning_rate, weight_decay=0.0, scheduler="constant", warmup_steps=0,
                               total_steps=6, max_grad_norm=1.0, clip_groups=[roles.trainable_parameters(grpo.POLICY)])
        sums = grpo.update(roles, ro, torch.ones(6, dtype=torch.bool), spec, backend, torch.Generator().manual_seed(3),
                           1, chunked=chunked)
        out[chunked] = (sums, [p.detach().clone() for p in roles.trainable_parameters(grpo.POLICY)])
    assert out[True][0]["updates"] == 6
    for key in ("loss", "approx_kl", "entropy", "kl", "clip_fraction_low", "clip_fraction_high"):
        assert out[True][0][key] == pytest.approx(out[False][0][key], rel=1e-8, abs=1e-10), key
    for a, b in zip(out[True][1], out[False][1]):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("section", ["ppo", "grpo"])
def test_the_setting(section: str) -> None:
    extra = {"rewards": [{"function": "exact_match"}]} if section == "grpo" else {}
    for value in (True, False, "auto"):
        assert getattr(parse_config({section: {"chunked_loss": value, **extra}}), section).chunked_loss == value
    assert getattr(parse_config({section: extra}), section).chunked_loss == "auto"
    with pytest.raises(ConfigError, match=f"{section}.chunked_loss"):
        parse_config({section: {"chunked_loss": "sometimes", **extra}})
