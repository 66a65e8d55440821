"""The rollout engine against today's path: the same greedy tokens whatever lever is on, the base
untouched however many rollouts run, finished rows padded, prompt buckets that change nothing.

Reference: ``model.generate`` on the unmerged adapter with a dynamic cache, one call for the whole
batch (what PPO and GRPO sampled with before the engine). fp32 on CPU, so "the same" is exact.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import transformers

from raypeft.adapters import LoraConfig, PrefixTuningConfig, get_adapter_model
from raypeft.adapters.generation_copy import GenerationCopy, foldable
from raypeft.pipeline.config import GenerationSpec
from raypeft.pipeline.rollout_engine import RolloutEngine, bucket_left, input_grad_hooks_off

PAD, EOS, NEW = 0, 2, 12


def _base(hidden: int = 32) -> transformers.LlamaForCausalLM:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      pad_token_id=PAD,
                                      bos_token_id=1, eos_token_id=EOS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.LlamaForCausalLM(config).eval()


def _trained_like(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-zero LoRA B (and DoRA magnitudes off their start) so the adapter changes the tokens."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            elif "lora_magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))


def _prompts(rows: int = 7, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompts of different lengths."""
    g = torch.Generator().manual_seed(seed)
    lengths = [3 + (i * 5) % 9 for i in range(rows)]
    width = max(lengths)
    ids = torch.full((rows, width), PAD)
    mask = torch.zeros((rows, width), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(3, 64, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


def _reference(model, ids, mask) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                             pad_token_id=PAD, eos_token_id=EOS)
    return out[:, ids.shape[1]:]


def _engine(**fields) -> RolloutEngine:
    return RolloutEngine(GenerationSpec(max_new_tokens=NEW, **fields))


def _generate(engine: RolloutEngine, model, adapter, ids, mask) -> torch.Tensor:
    return engine.generate(model, adapter, ids, mask, pad_token_id=PAD, eos_token_id=EOS,
                           sampling={"do_sample": False})


def _trim(tokens: torch.Tensor) -> list[list[int]]:
    """Each row up to and with its first eos: what a rollout keeps."""
    out = []
    for row in tokens.tolist():
        out.append(row[:row.index(EOS) + 1] if EOS in row else row)
    return out


@pytest.fixture()
def lora_model():
    model = get_adapter_model(_base(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                              adapter_name="policy")
    _trained_like(model)
    return model.eval()


@pytest.mark.parametrize("levers", [
    {},
    {"fold_adapter": True},
    {"fold_adapter": True, "cache": "static"},
    {"fold_adapter": True, "batch_size": 3, "prompt_bucket": 8},
    {"cache": "static", "batch_size": 2, "prompt_bucket": 16},
], ids=["plain", "fold", "fold-static", "fold-batch-bucket", "static-batch-bucket"])
def test_greedy_tokens_equal_todays_path(lora_model, levers: dict) -> None:
    ids, mask = _prompts()
    expected = _trim(_reference(lora_model, ids, mask))
    engine = _engine(**levers)
    assert engine.folds(lora_model, "policy", {}) == bool(levers.get("fold_adapter"))
    assert _trim(_generate(engine, lora_model, "policy", ids, mask)) == expected
    assert _trim(_reference(lora_model, ids, mask)) == expected  # the model is unchanged after the engine ran


def test_dora_and_rslora_fold_to_the_same_tokens() -> None:
    model = get_adapter_model(_base(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True,
                                                  use_rslora=True), adapter_name="policy")
    _trained_like(model)
    ids, mask = _prompts()
    assert _trim(_generate(_engine(fold_adapter=True), model, "policy", ids, mask)) == \
        _trim(_reference(model, ids, mask))


def test_the_base_stays_bit_identical_over_many_rollouts_and_updates(lora_model) -> None:
    before = {n: p.detach().clone() for n, p in lora_model.named_parameters() if "lora_" not in n}
    engine = _engine(fold_adapter=True, cache="static", batch_size=4)
    ids, mask = _prompts()
    opt = torch.optim.SGD([p for n, p in lora_model.named_parameters() if "lora_" in n], lr=0.5)
    for step in range(6):
        _generate(engine, lora_model, "policy", ids, mask)
        loss = lora_model(input_ids=ids, attention_mask=mask).logits.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
    for name, p in lora_model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, before[name]), name
    # The copy followed the adapter's updates: still the unmerged model's tokens.
    assert _trim(_generate(engine, lora_model, "policy", ids, mask)) == _trim(_reference(lora_model, ids, mask))


def test_the_copy_holds_only_the_policy_and_puts_the_layers_back(lora_model) -> None:
    lora_model.add_adapter("reward", LoraConfig(r=2, target_modules=["q_proj"]))
    lora_model.set_adapter("policy")
    copy_ = GenerationCopy(lora_model, "policy")
    layers = {n: m for n, m in lora_model.named_modules()}
    with copy_.swapped_in():
        assert not any("lora_A" in n for n, _ in lora_model.named_modules())
    assert {n: m for n, m in lora_model.named_modules()} == layers
    assert copy_.num_bytes == sum(m.base_layer.weight.numel() * 4 for n, m in layers.items()
                                  if hasattr(m, "lora_A") and "policy" in m.lora_A)


def test_virtual_tokens_sample_unmerged_with_their_own_cache() -> None:
    model = get_adapter_model(_base(), PrefixTuningConfig(num_virtual_tokens=4), adapter_name="policy").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    ids, mask = _prompts()
    engine = _engine(fold_adapter=True, cache="static", batch_size=3, prompt_bucket=8)
    assert not engine.folds(model, "policy", {}) and not foldable(model, "policy")
    assert _trim(_generate(engine, model, "policy", ids, mask)) == _trim(_reference(model, ids, mask))


def test_no_fold_under_zero3_or_synced_generation(lora_model) -> None:
    engine = _engine(fold_adapter=True)
    assert not engine.folds(lora_model, "policy", {"synced_gpus": True})
    assert not engine.folds(lora_model, None, {})
    partitioned = copy.deepcopy(lora_model)
    next(partitioned.parameters()).ds_id = 0  # what ZeRO-3 marks a partitioned parameter with
    assert not engine.folds(partitioned, "policy", {})


def test_finished_rows_are_padded_and_batches_of_different_lengths_line_up(lora_model) -> None:
    ids, mask = _prompts(rows=6)
    full = _generate(_engine(), lora_model, "policy", ids, mask)
    for size in (1, 4):
        split = _generate(_engine(batch_size=size), lora_model, "policy", ids, mask)
        assert split.shape[0] == 6
        assert _trim(split) == _trim(full)
        for row in split.tolist():
            if EOS in row:
                assert set(row[row.index(EOS) + 1:]) <= {PAD, EOS}


def test_prompt_buckets_pad_left_to_a_multiple_and_mask_it() -> None:
    ids, mask = _prompts()
    width = ids.shape[1]
    b_ids, b_mask = bucket_left(ids, mask, 8, PAD)
    assert b_ids.shape[1] % 8 == 0 and b_ids.shape[1] - width < 8
    assert torch.equal(b_ids[:, -width:], ids) and torch.equal(b_mask[:, -width:], mask)
    assert int(b_mask[:, :-width].sum()) == 0
    assert bucket_left(ids, mask, 0, PAD)[0] is ids


def test_quantized_base_folds_into_a_dense_copy() -> None:
    pytest.importorskip("bitsandbytes")
    from raypeft.adapters import quantize_linear_layers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = quantize_linear_layers(_base(hidden=128), 4, compute_dtype=torch.float32)  # whole 4-bit blocks
    model = get_adapter_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), adapter_name="policy")
    _trained_like(model)
    model.eval()
    ids, mask = _prompts()
    expected = _trim(_reference(model, ids, mask))  # bitsandbytes repacks its CPU layout on first use
    quantized = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    engine = _engine(fold_adapter=True)
    assert engine.folds(model, "policy", {})
    for _ in range(3):
        assert _trim(_generate(engine, model, "policy", ids, mask)) == expected
    for name, p in model.named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, quantized[name]), name


def test_a_folded_layer_computes_in_its_dtype_and_answers_in_the_input_dtype() -> None:
    """As a bitsandbytes layer: float32 activations (a k-bit-prepared model keeps its norms in
    float32) meet a bf16 copy in a bf16 matmul, and the result comes back in float32; the copy
    itself is never converted."""
    from raypeft.adapters.generation_copy import FoldedLinear

    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(6, 8, generator=g).bfloat16(), torch.randn(6, generator=g)
    folded = FoldedLinear(weight, bias)
    x = torch.randn(3, 8, generator=g)
    out = folded(x)
    assert out.dtype == torch.float32 and folded.weight.dtype == torch.bfloat16
    assert torch.equal(out, torch.nn.functional.linear(x.bfloat16(), weight, bias.bfloat16()).float())
    same = FoldedLinear(weight.float(), bias)
    assert torch.equal(same(x), torch.nn.functional.linear(x, weight.float(), bias))


def test_input_grad_hooks_are_off_while_generating_and_back_after() -> None:
    """k-bit preparation's embedding hook (``requires_grad_`` on the output) breaks a compiled
    decode step's graph; the engine lifts it for the call and puts it back for training."""
    model = get_adapter_model(_base(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                              adapter_name="policy")
    hf = next(m for m in model.modules() if isinstance(m, transformers.PreTrainedModel))
    hf.enable_input_require_grads()
    ids = torch.tensor([[5, 6, 7]])
    embed = hf.get_input_embeddings()
    embed.weight.requires_grad_(False)  # a frozen base: only the hook makes the output require grad
    with torch.no_grad():
        assert embed(ids).requires_grad is True  # the hook acts even under no_grad
        with input_grad_hooks_off(model):
            assert not any(getattr(m, "_require_grads_hooks", None) for m in model.modules())
            assert embed(ids).requires_grad is False
    assert embed(ids).requires_grad is True  # live again after the call: adapters below get gradients


@pytest.mark.parametrize("dora", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_refreshing_the_copy_gives_the_fold_bit_for_bit(dora: bool, dtype: torch.dtype) -> None:
    """The refresh before each rollout (one ``addmm`` per weight for plain LoRA) writes exactly what
    folding from scratch gives, on a float32 and a bf16 base, after the adapter moved; for plain
    LoRA that is ``W0 + s B A`` rounded once into the base's dtype (against float64)."""
    from raypeft.adapters.generation_copy import _folded_weight

    model = get_adapter_model(_base(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=dora),
                              adapter_name="policy").to(dtype)
    _trained_like(model)
    copy_ = GenerationCopy(model, "policy")
    _trained_like(model, seed=7)  # the adapter moves after the copy was made
    copy_.refresh()
    for _, _, layer, folded in copy_._slots:
        assert folded.weight.dtype == dtype
        assert torch.equal(folded.weight, _folded_weight(layer, "policy", dtype))
        if not dora:
            a, b = (t.detach().double() for t in layer._lora_pair("policy"))
            exact = layer._dense_weight_oi().double() + layer.scaling["policy"] * (b @ a)
            # one rounding into the dtype (half its relative step), plus the float32 accumulation of the rank-r product
            bound = torch.finfo(dtype).eps / 2 * exact.abs() + \
                4 * torch.finfo(torch.float32).eps * abs(layer.scaling["policy"]) * (b.abs() @ a.abs())
            assert ((folded.weight.double() - exact).abs() <= bound).all()


def test_stacked_projections_give_the_unstacked_outputs_and_trace_as_one_graph(lora_model) -> None:
    """Query/key/value and gate/up stacked into one matrix each: the same logits as the copy without
    stacking, a refresh writes through the stacked weight, the hand-over state is empty after every
    forward, and dynamo traces the forward as one graph (the compiled decode step needs that)."""
    lora_model.set_adapter("policy")
    ids, mask = _prompts()
    lm = lora_model.get_base_model()
    plain = GenerationCopy(lora_model, "policy", fuse_projections=False)
    stacked = GenerationCopy(lora_model, "policy")
    assert len(stacked.groups) == 2 * lm.config.num_hidden_layers
    assert [g.sizes for g in stacked.groups[:2]] == [[32, 16, 16], [64, 64]]

    def logits(copy_: GenerationCopy, forward=lm) -> torch.Tensor:
        with torch.no_grad(), copy_.swapped_in():
            out = forward(input_ids=ids, attention_mask=mask, use_cache=False).logits
            assert all(g.input is None and not g.pending for g in copy_.groups)
        return out

    expected = logits(plain)
    torch.testing.assert_close(logits(stacked), expected, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
    try:
        traced = logits(stacked, torch.compile(lm, backend="eager", fullgraph=True))
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(traced, expected, rtol=1e-5, atol=1e-5)

    _trained_like(lora_model, seed=9)
    plain.refresh()
    stacked.refresh()
    for (*_, a), (*_, b) in zip(plain._slots, stacked._slots):
        assert torch.equal(a.weight, b.weight)
    for group in stacked.groups:
        assert torch.equal(group.weight, torch.cat([m.weight for m in group.members]))
    torch.testing.assert_close(logits(stacked), logits(plain), rtol=1e-5, atol=1e-5)


def test_a_stacked_member_called_on_another_input_computes_its_own_rows(lora_model) -> None:
    copy_ = GenerationCopy(lora_model, "policy")
    group = copy_.groups[0]
    q, k, v = group.members
    x, y = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    torch.testing.assert_close(q(x), torch.nn.functional.linear(x, q.weight))
    assert group.input is x and sorted(group.pending) == [1, 2]
    torch.testing.assert_close(k(y), torch.nn.functional.linear(y, k.weight))  # not x's pending rows
    torch.testing.assert_close(k(x), torch.nn.functional.linear(x, k.weight))
    torch.testing.assert_close(v(x), torch.nn.functional.linear(x, v.weight))
    assert group.input is None and not group.pending
    with copy_.swapped_in():
        v(x)  # called first: leaves q's and k's rows pending until the copy is swapped out
        assert sorted(group.pending) == [0, 1]
    assert group.input is None and not group.pending
