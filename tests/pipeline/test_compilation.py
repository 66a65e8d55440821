"""``<stage>.compile``: the decoder stack under ``torch.compile`` computes what it computes eagerly.

A tiny Llama with LoRA (float32, CPU): the chunked SFT loss (whose chunk function is compiled too
while the stack is; Inductor's C++ backend) and DPO's pair terms (policy with gradients, the
reference with the adapter disabled under ``no_grad``; traced without code generation), with the
adapter's gradients, against the same model run eagerly; the stack runs eagerly again after the block; the config refuses compile
under DeepSpeed.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from raypeft.adapters import LoraConfig, get_adapter_model
from raypeft.pipeline import compilation
from raypeft.pipeline.config import ConfigError, parse_config
from raypeft.pipeline.data import IGNORE_INDEX
from raypeft.pipeline.data.packing import PackedPairCollator, PackedSFTCollator
from raypeft.pipeline.lm_head_loss import causal_lm_loss
from raypeft.pipeline.roles import Roles
from raypeft.pipeline.stages import dpo

VOCAB = 64


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from nothing, and leaves no graphs (nor the fake tensors they hold) behind."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _base() -> torch.nn.Module:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")


def _perturb(module: torch.nn.Module) -> None:
    """Adapter weights off their start (B = 0 would make the adapter invisible to the check)."""
    torch.manual_seed(1)
    for p in module.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    module.zero_grad(set_to_none=True)
    return out


def _sft_batches() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    collate = PackedSFTCollator(max_tokens=24, pad_token_id=0)
    batches = []
    for lengths in ([5, 17, 2, 3, 9], [11, 7, 2, 3, 1, 20]):  # the same packed shape twice: one compile
        rows = []
        for n in lengths:
            ids = torch.randint(4, VOCAB, (n,), generator=g).tolist()
            rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 3) + ids[n // 3:]})
        batches.append(collate(rows))
    return batches


def test_decoder_stack_is_found_through_every_wrapper() -> None:
    model = get_adapter_model(_base(), _lora())
    stack = model.get_base_model().model
    assert compilation.decoder_stack(model) is stack
    assert compilation.decoder_stack(model.get_base_model()) is stack
    roles = Roles(_base())
    roles.add("policy", _lora(), trainable=True)
    assert compilation.decoder_stack(roles) is roles.model.get_base_model().model
    assert compilation.decoder_stack(torch.nn.Linear(2, 2)) is None


def test_compiled_sft_loss_and_grads_equal_eager() -> None:
    model = get_adapter_model(_base(), _lora())
    _perturb(model)
    batches = _sft_batches()
    eager = []
    for batch in batches:
        loss = causal_lm_loss(model, batch, chunk=16)
        loss.backward()
        eager.append((loss.detach(), _grads(model)))
    with compilation.compiled(model):
        assert compilation.is_compiled(model)
        for batch, (loss_ref, grads_ref) in zip(batches, eager):
            loss = causal_lm_loss(model, batch, chunk=16)
            loss.backward()
            grads = _grads(model)
            torch.testing.assert_close(loss.detach(), loss_ref, rtol=1e-5, atol=1e-6)
            assert grads.keys() == grads_ref.keys() and grads
            for name in grads:
                torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    assert not compilation.is_compiled(model)  # eager again outside the block (generation, ROUGE)
    assert model.get_base_model().model._compiled_call_impl is None


def test_compiled_dpo_pair_terms_equal_eager() -> None:
    roles = Roles(_base())
    roles.add(dpo.POLICY, _lora(), trainable=True)
    roles.add_base(dpo.REFERENCE)
    _perturb(roles)
    roles.train()
    g = torch.Generator().manual_seed(2)

    def ids(n: int) -> list[int]:
        return torch.randint(4, VOCAB, (n,), generator=g).tolist()

    rows = []
    for p, c, r in [(3, 5, 4), (6, 2, 7), (2, 9, 3)]:
        prompt, row = ids(p), {}
        for side, n in (("chosen", c), ("rejected", r)):
            response = ids(n)
            row.update({f"{side}_input_ids": prompt + response, f"{side}_labels": [IGNORE_INDEX] * p + response})
        rows.append(row)
    batch = PackedPairCollator(max_tokens=32, pad_token_id=0)(rows)
    for chunked in (False, True):
        losses, *terms = dpo.pair_terms(roles, batch, beta=0.1, loss_type="sigmoid", chunked=chunked)
        losses.mean().backward()
        ref_terms, ref_grads = [t.detach() for t in (losses, *terms)], _grads(roles)
        # traced as the stage traces it, without Inductor's C++ code generation (minutes on 2 cores)
        with compilation.compiled(roles, backend="aot_eager"):
            losses, *terms = dpo.pair_terms(roles, batch, beta=0.1, loss_type="sigmoid", chunked=chunked)
            losses.mean().backward()
        for got, want in zip([t.detach() for t in (losses, *terms)], ref_terms):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        grads = _grads(roles)
        assert grads.keys() == ref_grads.keys() and grads
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_compiled_is_a_no_op_when_off() -> None:
    model = get_adapter_model(_base(), _lora())
    with compilation.compiled(model, on=False):
        assert not compilation.is_compiled(model)


def test_compile_under_deepspeed_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"sft\.compile: not with deepspeed"):
        parse_config({"stages": ["sft"], "sft": {"compile": True}, "deepspeed": "zero3_offload"})
    with pytest.raises(ConfigError, match=r"dpo\.compile: not with deepspeed"):
        parse_config({"stages": ["dpo"], "dpo": {"compile": True}, "deepspeed": "zero3_offload"})
    # a stage not run may keep the setting
    assert parse_config({"stages": ["sft"], "dpo": {"compile": True}, "deepspeed": "zero3_offload"}).dpo.compile
