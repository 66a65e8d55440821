"""Packing for SFT: the packed row's loss, gradients and logits equal the padded batch's.

A tiny Llama (random weights, made from a config) with a LoRA adapter scores the same rows twice:
padded (``SFTCollator``) and packed into one row (``PackedSFTCollator``). Equal logits per row
show that no token attended across a row boundary; equal loss and adapter gradients show the
packed step is the unpacked step.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from raypeft.adapters import LoraConfig, get_adapter_model
from raypeft.pipeline.config import ConfigError
from raypeft.pipeline.config.loading import parse_config
from raypeft.pipeline.data import IGNORE_INDEX, SFTCollator, count_tokens
from raypeft.pipeline.data.packing import PackedSFTCollator, pack_layout, pack_rows


def _rows(seed: int = 0) -> list[dict[str, list[int]]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for length, prompt in [(5, 2), (17, 9), (3, 1), (40, 30), (9, 4), (2, 1)]:  # long-tailed, one of length 2
        ids = torch.randint(4, 96, (length,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": [IGNORE_INDEX] * prompt + ids[prompt:]})
    return rows


def _model(attn: str) -> torch.nn.Module:
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        attn_implementation=attn))
    model = get_adapter_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():  # non-zero B so the adapter's gradients are all non-trivial
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return model.double()


@pytest.mark.parametrize("max_tokens", [None, 40, 45, 64])
def test_pack_rows_layout(max_tokens):
    rows = _rows()
    packed = pack_rows(rows, max_tokens=max_tokens, pad_token_id=0)
    assert packed.pop("use_cache") is False  # else the model makes a cache and ignores the boundaries
    bins = pack_layout([len(r["input_ids"]) for r in rows], max_tokens)
    assert sorted(i for b in bins for i in b) == list(range(len(rows)))  # every row once
    width = max(sum(len(rows[i]["input_ids"]) for i in b) for b in bins)
    assert {k: tuple(v.shape) for k, v in packed.items()} == {k: (len(bins), width)
                                                                for k in ("input_ids", "labels", "position_ids")}
    if max_tokens is None:
        assert len(bins) == 1 and "attention_mask" not in packed  # one row, no padding at all
        assert count_tokens(packed) == sum(len(r["input_ids"]) for r in rows)
    for b, members in enumerate(bins):
        used = sum(len(rows[i]["input_ids"]) for i in members)
        assert max_tokens is None or used <= max_tokens or len(members) == 1
        at = 0
        for i in members:
            r, n = rows[i], len(rows[i]["input_ids"])
            assert packed["position_ids"][b, at:at + n].tolist() == list(range(n))
            assert packed["input_ids"][b, at:at + n].tolist() == r["input_ids"]
            assert packed["labels"][b, at].item() == IGNORE_INDEX
            assert packed["labels"][b, at + 1:at + n].tolist() == r["labels"][1:]
            at += n
        assert packed["labels"][b, at:].eq(IGNORE_INDEX).all()  # the tail padding is never learned
        assert packed["position_ids"][b, at:].tolist() == list(range(width - at))  # and is its own block


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("max_tokens", [None, 45])
def test_packed_equals_padded(attn, max_tokens):
    rows = _rows()
    model = _model(attn)
    padded = SFTCollator(pad_token_id=0)(rows)
    packed = PackedSFTCollator(max_tokens=max_tokens)(rows)
    assert padded["input_ids"].numel() > packed["input_ids"].numel()  # the padding really is gone (most of it)

    out_padded = model(**padded)
    out_padded.loss.backward()
    grads_padded = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    out_packed = model(**packed)
    out_packed.loss.backward()
    grads_packed = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    torch.testing.assert_close(out_packed.loss, out_padded.loss, rtol=1e-9, atol=1e-9)
    assert grads_padded.keys() == grads_packed.keys() and grads_padded
    for name in grads_padded:
        torch.testing.assert_close(grads_packed[name], grads_padded[name], rtol=1e-7, atol=1e-10, msg=name)
    bins = pack_layout([len(r["input_ids"]) for r in rows], max_tokens)
    for b, members in enumerate(bins):  # each row's logits as if alone: nothing crossed a boundary
        at = 0
        for i in members:
            n = len(rows[i]["input_ids"])
            torch.testing.assert_close(out_packed.logits[b, at:at + n], out_padded.logits[i, :n], rtol=1e-9,
                                       atol=1e-9)
            at += n


def test_float32_loss_within_tolerance():
    """In the training dtype the two losses differ only by summation order."""
    rows = _rows(1)
    model = _model("sdpa").float()
    with torch.no_grad():
        a = model(**SFTCollator(pad_token_id=0)(rows)).loss
        b = model(**PackedSFTCollator(max_tokens=45)(rows)).loss
    assert abs(a.item() - b.item()) < 1e-5


@pytest.mark.parametrize("data, problem", [
    ({"data": {"packing": True}, "model": {"task_type": "SEQ_2_SEQ_LM"}},
     r"data\.packing: needs a causal LM \(model\.task_type: CAUSAL_LM\), got SEQ_2_SEQ_LM"),
    ({"data": {"packing": True}, "adapter": {"method": "prompt"}},
     r"data\.packing: needs a weight-space adapter method .* method 'prompt' adds virtual tokens"),
])
def test_packing_config_rules(data, problem):
    with pytest.raises(ConfigError, match=problem):
        parse_config({"name": "x", **data})
    assert parse_config({"name": "x", "data": {"packing": True}}).data.packing
