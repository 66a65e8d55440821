"""Grouped decode attention (``pipeline.decode_attention``) against a hand-written attention over
the key/value heads expanded per query head, and against transformers' ``sdpa`` in the decode
loop: the same outputs, the same greedy tokens, and the expanded copy never made."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from raypeft.adapters import LoraConfig, get_adapter_model
from raypeft.adapters.generation_copy import GenerationCopy
from raypeft.pipeline import decode_attention
from raypeft.pipeline.decode_attention import NAME, grouped_decode_attention, grouped_sdpa_forward
from raypeft.pipeline.decode_loop import DecodeLoop, decode_step, plan_decode

from test_rollout_engine import NEW, PAD, _base, _prompts, _trained_like


def _reference(q, k, v, mask, scale):
    """Softmax attention with every key/value head repeated for its query heads (``repeat_kv``)."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return (scores.softmax(-1) @ v).transpose(1, 2)


def _inputs(batch=3, heads=8, kv_heads=2, q_len=1, cache=11, dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, dim, generator=g)
    k, v = (torch.randn(batch, kv_heads, cache, dim, generator=g) for _ in range(2))
    mask = torch.rand(batch, 1, q_len, cache, generator=g) > 0.3
    mask[..., 0] = True  # every query sees at least one position
    return q, k, v, mask


def _module(groups: int) -> SimpleNamespace:
    return SimpleNamespace(num_key_value_groups=groups, is_causal=True, training=False)


@pytest.mark.parametrize("mask_kind", ["bool", "additive"])
@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (4, 1), (6, 3)])
def test_one_query_token_matches_attention_over_repeated_heads(heads: int, kv_heads: int, mask_kind: str) -> None:
    q, k, v, mask = _inputs(heads=heads, kv_heads=kv_heads)
    if mask_kind == "additive":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    scale = 1 / math.sqrt(q.shape[-1])
    out, weights = grouped_sdpa_forward(_module(heads // kv_heads), q, k, v, mask, scaling=scale)
    assert weights is None and out.shape == (q.shape[0], 1, heads, q.shape[-1])
    torch.testing.assert_close(out, _reference(q, k, v, mask, scale), atol=1e-5, rtol=1e-5)
    sdpa, _ = sdpa_attention_forward(_module(heads // kv_heads), q, k, v, mask, scaling=scale)
    torch.testing.assert_close(out, sdpa, atol=1e-6, rtol=1e-6)


def test_the_kernel_sees_the_unexpanded_cache(monkeypatch) -> None:
    """The point of it: attention runs over ``H_kv`` heads with ``groups`` queries each."""
    seen = []
    real = decode_attention.F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append((tuple(q.shape), tuple(k.shape)))
        return real(q, k, v, **kw)

    monkeypatch.setattr(decode_attention.F, "scaled_dot_product_attention", spy)
    q, k, v, mask = _inputs(batch=3, heads=8, kv_heads=2, cache=11, dim=16)
    grouped_sdpa_forward(_module(4), q, k, v, mask)
    assert seen == [((3, 2, 4, 16), (3, 2, 11, 16))]


@pytest.mark.parametrize("case", ["prefill", "no-mask", "no-groups"])
def test_everything_else_is_transformers_sdpa(case: str) -> None:
    q, k, v, mask = _inputs(q_len=5 if case == "prefill" else 1, heads=4 if case == "no-groups" else 8,
                            kv_heads=4 if case == "no-groups" else 2)
    mask = None if case == "no-mask" else mask
    groups = q.shape[1] // k.shape[1]
    ours, _ = grouped_sdpa_forward(_module(groups), q, k, v, mask)
    theirs, _ = sdpa_attention_forward(_module(groups), q, k, v, mask)
    assert torch.equal(ours, theirs)


def test_the_switch_covers_sdpa_only_and_is_undone_on_error() -> None:
    lm = _base()
    assert lm.config._attn_implementation == "sdpa"
    with pytest.raises(RuntimeError, match="inside"):
        with grouped_decode_attention(lm) as switched:
            assert switched and lm.config._attn_implementation == NAME
            assert lm.model.layers[0].self_attn.config._attn_implementation == NAME
            raise RuntimeError("inside")
    assert lm.config._attn_implementation == "sdpa"
    lm.config._attn_implementation = "eager"
    with grouped_decode_attention(lm) as switched:
        assert not switched and lm.config._attn_implementation == "eager"


@pytest.fixture(scope="module")
def folded():
    model = get_adapter_model(_base(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                              adapter_name="policy")
    _trained_like(model)
    return model.eval()


def test_the_loop_decodes_the_same_tokens_through_it(folded, monkeypatch) -> None:
    """Left-padded prompts (a mask in every step): the greedy tokens equal those of transformers'
    sdpa, and every decode step's attention (not the prefill's) ran over the 2 key/value heads."""
    lm = folded.get_base_model()
    ids, mask = _prompts()
    plan = plan_decode(lm, sampling={"do_sample": False}, eos_token_id=[29], pad_token_id=PAD, max_new_tokens=NEW)
    packed = []
    real = decode_attention.F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        packed.append((q.shape[1], k.shape[1], q.shape[2]))
        return real(q, k, v, **kw)

    with GenerationCopy(folded, "policy").swapped_in():
        plain = DecodeLoop(grouped_attention=False).generate(lm, ids, mask, plan)
        monkeypatch.setattr(decode_attention.F, "scaled_dot_product_attention", spy)
        loop = DecodeLoop()
        grouped = loop.generate(lm, ids, mask, plan)
    assert torch.equal(grouped, plain)
    assert lm.config._attn_implementation == "sdpa"
    layers = lm.config.num_hidden_layers
    prefill, steps = packed[:layers], packed[layers:]
    assert all(heads == 4 for heads, _, _ in prefill)  # transformers' sdpa: the cache repeated per query head
    assert steps == [(2, 2, 2)] * (layers * loop.steps)  # 2 key/value heads, 2 queries each


def test_the_step_traces_as_one_graph_through_it(folded) -> None:
    """What the compiled step captures with the grouped attention in place: one graph, no break."""
    lm = folded.get_base_model()
    ids, mask = _prompts()
    plan = plan_decode(lm, sampling={"do_sample": False}, eos_token_id=[29], pad_token_id=PAD, max_new_tokens=NEW)
    loop = DecodeLoop()
    with GenerationCopy(folded, "policy").swapped_in():
        loop.generate(lm, ids, mask, plan)
        s = loop._slots[ids.shape[0]]
        s.step.fill_(1)
        for layer in s.cache.layers:
            layer.cumulative_length.fill_(ids.shape[1] + 1)
        with grouped_decode_attention(lm):
            explained = torch._dynamo.explain(decode_step)(lm, "cache", s, torch.tensor([29]), PAD, plan.rule)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
