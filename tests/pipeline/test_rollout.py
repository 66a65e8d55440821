"""``pipeline.rollout``: re-packing sampled responses, and scoring them with or without a critic
(a critic-free online stage reads the same log-probabilities and scores as PPO)."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import torch
import transformers

from raypeft.pipeline import rollout
from raypeft.pipeline.config import parse_config
from raypeft.pipeline.modeling import adapter_config
from raypeft.pipeline.roles import Roles
from raypeft.pipeline.stages import ppo

EOS, PAD = 2, 0


def test_pack_cuts_after_the_first_eos_and_right_pads() -> None:
    prompt_ids = torch.tensor([[0, 5, 6], [7, 8, 9]])  # left-padded
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    generated = torch.tensor([[4, EOS, 4, 4], [3, 3, 3, 3]])
    ro = rollout.pack(prompt_ids, prompt_mask, generated, EOS, PAD)
    assert ro.input_ids.tolist() == [[5, 6, 4, EOS, PAD, PAD, PAD], [7, 8, 9, 3, 3, 3, 3]]
    assert ro.attention_mask.tolist() == [[1, 1, 1, 1, 0, 0, 0], [1] * 7]
    assert ro.tokens.tolist() == [[4, EOS, PAD, PAD], [3, 3, 3, 3]]
    assert ro.mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert ro.index.tolist() == [[1, 2, 0, 0], [2, 3, 4, 5]]  # logits[:, :-1] position predicting each token
    assert ro.ended.tolist() == [True, False]


def test_scoring_without_a_critic_gives_ppos_figures_and_no_values() -> None:
    cfg = parse_config({"adapter": {"r": 4, "lora_alpha": 8}, "ppo": {"rollout_batch_size": 8, "minibatches": 2,
                                                                       "generation": {"max_new_tokens": 5}}})
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=PAD, eos_token_id=EOS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        roles = Roles(transformers.LlamaForCausalLM(config).eval())
    fresh = adapter_config(cfg.adapter, cfg.model)
    roles.add(ppo.POLICY, fresh, trainable=True)
    roles.add_base(ppo.REFERENCE)
    roles.add(ppo.REWARD, fresh, trainable=False, value_head="zero")
    roles.add(ppo.CRITIC, fresh, trainable=True, value_head="zero")
    roles.eval()
    tokenizer = SimpleNamespace(pad_token_id=PAD, eos_token_id=EOS)
    prompts = torch.randint(3, 16, (8, 4), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": prompts, "attention_mask": torch.ones_like(prompts)}

    torch.manual_seed(5)
    with_critic = ppo.make_rollout(roles, batch, cfg.ppo, tokenizer, chunk=4)
    torch.manual_seed(5)
    ro = rollout.sample(roles, ppo.POLICY, batch, cfg.ppo.generation, tokenizer)
    rollout.score(roles, ro, chunk=4, temperature=cfg.ppo.generation.temperature, policy=ppo.POLICY,
                  reference=ppo.REFERENCE, reward=ppo.REWARD)
    assert ro.values is None and with_critic.values is not None
    for name in ("input_ids", "tokens", "mask", "logprobs", "ref_logprobs", "scores"):
        assert torch.equal(getattr(ro, name), getattr(with_critic, name)), name
    assert (ro.logprobs[ro.mask == 0] == 0).all() and (ro.logprobs[ro.mask == 1] < 0).all()
