"""The PPO loop (rollout -> advantages -> clipped updates) raises a reward it can see, in-process.

A tiny random Llama learns to emit a chosen token: the reward role's score is replaced by the
count of that token in the response, so success depends only on the PPO machinery
(``make_rollout``, ``add_advantages``, ``ppo_update``) and not on a trained reward model.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import torch
import transformers

from raypeft.pipeline.backends import TorchBackend
from raypeft.pipeline.config import parse_config
from raypeft.pipeline.modeling import adapter_config
from raypeft.pipeline.rl_math import RunningMoments
from raypeft.pipeline.roles import Roles
from raypeft.pipeline.stages import ppo

TARGET, PROMPT_LEN = 7, 5


def _roles(cfg) -> Roles:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=2,
                                      initializer_range=0.3)  # logits wide enough to be steered
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = transformers.LlamaForCausalLM(config).eval()
    roles = Roles(base)
    fresh = adapter_config(cfg.adapter, cfg.model)
    roles.add(ppo.POLICY, fresh, trainable=True)
    roles.add_base(ppo.REFERENCE)
    roles.add(ppo.REWARD, fresh, trainable=False, value_head="zero")
    roles.add(ppo.CRITIC, fresh, trainable=True, value_head="zero")
    roles.primary = ppo.POLICY

    def target_count(role, input_ids, attention_mask):  # stands in for a trained reward model
        assert role == ppo.REWARD
        response = input_ids[:, PROMPT_LEN:]
        return ((response == TARGET) & attention_mask[:, PROMPT_LEN:].bool()).float().sum(1)

    roles.scores = target_count
    return roles.eval()


def test_ppo_steps_raise_the_reward_and_move_away_from_the_reference() -> None:
    cfg = parse_config({"adapter": {"r": 4, "lora_alpha": 8}, "ppo": {
        "rollout_batch_size": 16, "minibatches": 2, "ppo_epochs": 2, "learning_rate": 2e-2,
        "generation": {"max_new_tokens": 6}, "kl": {"controller": "fixed", "coef": 0.02}}})
    spec = cfg.ppo
    roles = _roles(cfg)
    tokenizer = SimpleNamespace(pad_token_id=0, eos_token_id=2)
    backend = TorchBackend(roles, lr=spec.learning_rate, weight_decay=0.0, scheduler="constant", warmup_steps=0,
                           total_steps=8, max_grad_norm=spec.max_grad_norm,
                           clip_groups=[roles.trainable_parameters(ppo.POLICY), roles.trainable_parameters(ppo.CRITIC)])
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 16, (16, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": prompts, "attention_mask": torch.ones_like(prompts)}
    rewards, kls = [], []
    moments = RunningMoments()  # as the stage does with ppo.normalize_scores (the default)
    for step in range(8):
        torch.manual_seed(100 + step)
        ro = ppo.make_rollout(roles, batch, spec, tokenizer, chunk=8)
        ppo.update_score_moments(moments, ppo.penalised_scores(ro, spec))
        ppo.add_advantages(ro, spec, kl_coef=spec.kl.coef, moments=moments)
        stats = ppo.rollout_stats(ro, spec.kl.coef)
        rewards.append(stats["reward_mean"])
        kls.append(stats["kl"])
        update = ppo.ppo_update(roles, ro, spec, backend, generator)
        assert set(update) == {"policy_loss", "value_loss", "clip_fraction", "value_clip_fraction", "approx_kl",
                               "entropy"}
    assert kls[0] == 0.0  # the first rollout comes from the reference itself
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 1.0, rewards  # from well under one target token per response to several
    assert kls[-1] > 0.5, kls  # ... by moving the policy away from the (frozen) reference
