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
from raypeft.pipeline.rollout_engine import RolloutEngine
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


def test_pack_rounds_the_width_up_with_masked_padding_only() -> None:
    prompt_ids = torch.tensor([[0, 5, 6], [7, 8, 9]])
    prompt_mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    generated = torch.tensor([[4, EOS, 4, 4], [3, 3, 3, 3]])
    plain = rollout.pack(prompt_ids, prompt_mask, generated, EOS, PAD)
    for multiple, width in ((4, 8), (7, 7), (16, 16)):
        ro = rollout.pack(prompt_ids, prompt_mask, generated, EOS, PAD, width_multiple=multiple)
        assert ro.input_ids.shape == (2, width)
        assert torch.equal(ro.input_ids[:, :7], plain.input_ids) and (ro.input_ids[:, 7:] == PAD).all()
        assert torch.equal(ro.attention_mask[:, :7], plain.attention_mask) and (ro.attention_mask[:, 7:] == 0).all()
        for name in ("index", "tokens", "mask", "ended"):  # response order: untouched
            assert torch.equal(getattr(ro, name), getattr(plain, name)), name


def _ppo_setup():
    """A PPO config, its four roles on a tiny Llama, a tokenizer stand-in and 8 prompts."""
    cfg = parse_config({"adapter": {"r": 4, "lora_alpha": 8}, "ppo": {"rollout_batch_size": 8, "minibatches": 2,
                                                                       "generation": {"max_new_tokens": 5}}})
    prompts = torch.randint(3, 16, (8, 4), generator=torch.Generator().manual_seed(1))
    return (cfg, _ppo_roles(cfg), SimpleNamespace(pad_token_id=PAD, eos_token_id=EOS),
            {"input_ids": prompts, "attention_mask": torch.ones_like(prompts)})


def _ppo_roles(cfg) -> Roles:
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
    with torch.no_grad():  # every adapter and head off its start, the frozen reward model's too
        for name, p in roles.named_parameters():
            if "lora_" in name or name.startswith("heads."):
                p.normal_(0, 0.1)
    roles.eval()
    return roles


def test_rollouts_padded_to_a_width_multiple_score_and_update_the_same() -> None:
    """The stages pad rollouts to ``data.pad_to_multiple_of`` on GPUs: scoring (policy, reference,
    critic, the reward at the last real token) and a PPO update's loss and gradients see only the
    real positions, so they equal the unpadded rollout's."""
    cfg, roles, tokenizer, batch = _ppo_setup()
    rollouts = {}
    for multiple in (None, 16):
        torch.manual_seed(5)
        engine = RolloutEngine(cfg.ppo.generation, multiple)
        rollouts[multiple] = ppo.make_rollout(roles, batch, cfg.ppo, tokenizer, chunk=4, rollout_engine=engine)
    plain, padded = rollouts[None], rollouts[16]
    assert padded.input_ids.shape[1] == 16 and plain.input_ids.shape[1] < 16
    assert torch.equal(plain.tokens, padded.tokens) and torch.equal(plain.mask, padded.mask)
    for name in ("logprobs", "ref_logprobs", "values", "scores"):
        torch.testing.assert_close(getattr(padded, name), getattr(plain, name), atol=1e-5, rtol=1e-5, msg=name)
    for ro in (plain, padded):
        ro.advantages = torch.randn(ro.mask.shape, generator=torch.Generator().manual_seed(2)) * ro.mask
        ro.returns = ro.values + ro.advantages
    grads = []
    for ro in (plain, padded):
        rows = ro.rows(torch.arange(8))
        logp, entropy, values = ppo.policy_and_critic(roles, rows, cfg.ppo.generation.temperature)
        loss = ((logp - rows["logprobs"]) * rows["advantages"]).sum() + (values * rows["mask"]).sum()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in roles.named_parameters() if p.grad is not None})
        roles.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-4, msg=name)


def test_scoring_without_a_critic_gives_ppos_figures_and_no_values() -> None:
    cfg, roles, tokenizer, batch = _ppo_setup()

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
