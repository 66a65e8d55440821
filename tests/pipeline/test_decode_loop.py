"""The own decode loop (``decode_loop: own``) against today's path: the same greedy tokens, the same
sampling filters, finished rows dropped without changing a token, and ``generate`` kept for what
the loop does not run.

Reference: ``model.generate`` on the unmerged adapter with a dynamic cache, one call for the whole
batch, fp32 on CPU, so "the same" is exact (shapes and padding after eos included).
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from raypeft.adapters import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_adapter_model
from raypeft.adapters.generation_copy import GenerationCopy
from raypeft.pipeline import rollout
from raypeft.pipeline.config import GenerationSpec, parse_config
from raypeft.pipeline.decode_loop import (CAPACITY_STEP, DecodeLoop, DecodePlan, batch_ladder, cache_capacity,
                                         decode_step, plan_decode)
from raypeft.pipeline.modeling import adapter_config
from raypeft.pipeline.roles import Roles
from raypeft.pipeline.rollout_engine import RolloutEngine
from raypeft.pipeline.stages import ppo
from raypeft.pipeline.token_sampling import SamplingRule, filter_scores, pick_tokens

from test_rollout_engine import EOS, NEW, PAD, _base, _prompts, _trained_like

# Tokens the LoRA fixture emits often, as stop tokens: rows end at different steps (1 to never).
STOPS = {"eos": EOS, "common": [29], "pair": [31, 10], "late": [48]}


def _reference(model, ids, mask, eos, new: int = NEW) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False,
                             pad_token_id=PAD, eos_token_id=eos)
    return out[:, ids.shape[1]:]


def _own(**fields) -> RolloutEngine:
    engine = RolloutEngine(GenerationSpec(max_new_tokens=fields.pop("max_new_tokens", NEW), decode_loop="own",
                                          **fields))
    engine.loop.check_every, engine.loop.min_rows = 1, 1  # look (and drop) at every step of these short runs
    return engine


def _generate(engine: RolloutEngine, model, ids, mask, eos, sampling=None, adapter="policy") -> torch.Tensor:
    return engine.generate(model, adapter, ids, mask, pad_token_id=PAD, eos_token_id=eos,
                           sampling=sampling or {"do_sample": False})


@pytest.fixture(scope="module")
def lora_model():
    model = get_adapter_model(_base(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                              adapter_name="policy")
    _trained_like(model)
    return model.eval()


@pytest.mark.parametrize("stop", list(STOPS))
@pytest.mark.parametrize("levers", [
    {},
    {"fold_adapter": True},
    {"fold_adapter": True, "drop_finished": True},
    {"fold_adapter": True, "batch_size": 3, "prompt_bucket": 8, "drop_finished": True},
    {"compile": True, "cache": "static", "prompt_bucket": 16},
], ids=["lora", "folded", "folded-drop", "folded-batch-bucket-drop", "compile-flag-on-cpu"])
def test_greedy_tokens_equal_todays_path(lora_model, levers: dict, stop: str) -> None:
    ids, mask = _prompts()
    expected = _reference(lora_model, ids, mask, STOPS[stop])
    engine = _own(**levers)
    got = _generate(engine, lora_model, ids, mask, STOPS[stop])
    assert engine.last_path == "own"
    assert torch.equal(got, expected)  # same width, same pad after each eos


def test_dropping_finished_rows_changes_no_token(lora_model) -> None:
    ids, mask = _prompts(rows=8)
    plan = plan_decode(lora_model.get_base_model(), sampling={"do_sample": False}, eos_token_id=[31, 10, 48],
                       pad_token_id=PAD, max_new_tokens=NEW)
    assert isinstance(plan, DecodePlan)
    keep = DecodeLoop(check_every=1)
    drop = DecodeLoop(drop_finished=True, check_every=1, min_rows=1)
    kept = keep.generate(lora_model.get_base_model(), ids, mask, plan)
    dropped = drop.generate(lora_model.get_base_model(), ids, mask, plan)
    assert keep.sizes == [8] and len(drop.sizes) > 1 and drop.sizes == sorted(drop.sizes, reverse=True)
    assert torch.equal(dropped, kept)
    assert torch.equal(kept, _reference(lora_model, ids, mask, [31, 10, 48]))
    for row in kept.tolist():
        ends = [i for i, t in enumerate(row) if t in (31, 10, 48)]
        if ends:
            assert set(row[ends[0] + 1:]) <= {PAD}


def test_the_loop_keeps_its_state_between_calls_of_other_shapes(lora_model) -> None:
    """A second call with longer prompts and a smaller batch grows the cache and stays exact."""
    engine = _own(fold_adapter=True, drop_finished=True)
    for rows, seed in ((7, 3), (3, 5), (7, 3)):
        ids, mask = _prompts(rows=rows, seed=seed)
        if rows == 3:
            ids, mask = torch.cat([torch.full((3, 9), 5), ids], 1), torch.cat([torch.ones(3, 9, dtype=torch.long),
                                                                            mask], 1)
        assert torch.equal(_generate(engine, lora_model, ids, mask, [29]), _reference(lora_model, ids, mask, [29]))
    assert engine.loop._slots
    engine.loop.release()
    assert not engine.loop._slots
    assert torch.equal(_generate(engine, lora_model, ids, mask, [29]), _reference(lora_model, ids, mask, [29]))


@pytest.mark.parametrize("drop", [False, True])
def test_a_smaller_last_chunk_decodes_at_the_kept_size(lora_model, drop: bool) -> None:
    """With replayed graphs (forced here on CPU) a 3-row last chunk runs in the 4-row slots, its
    filler row done from the start and never returned."""
    ids, mask = _prompts()
    engine = _own(batch_size=4, drop_finished=drop)
    engine.loop.pad_to_kept = True
    assert torch.equal(_generate(engine, lora_model, ids, mask, [31, 10]), _reference(lora_model, ids, mask, [31, 10]))
    assert engine.loop.sizes[0] == 4 and sorted(engine.loop._slots)[-1] == 4


def test_a_compiled_step_keeps_its_cache_over_prompts_of_other_widths(lora_model, monkeypatch) -> None:
    """With a compiled step (stood in for on CPU by any function that is not ``decode_step``) the
    cache is allocated in multiples of ``CAPACITY_STEP`` positions, so a rollout whose longest
    prompt is longer or shorter reuses the slots (the graph's addresses and shapes) instead of
    recompiling, and the masked positions change no token."""
    loop = DecodeLoop()
    monkeypatch.setattr(loop, "_step_fn", lambda device: lambda *a: decode_step(*a))
    lm = lora_model.get_base_model()
    plan = plan_decode(lm, sampling={"do_sample": False}, eos_token_id=[31, 10], pad_token_id=PAD, max_new_tokens=NEW)
    slots = None
    for extra in (0, 30, 11):
        ids, mask = _prompts(rows=7, seed=3)
        ids = torch.cat([torch.full((7, extra), 5), ids], 1)
        mask = torch.cat([torch.ones(7, extra, dtype=torch.long), mask], 1)
        assert torch.equal(loop.generate(lm, ids, mask, plan), _reference(lora_model, ids, mask, [31, 10]))
        assert loop._capacity == CAPACITY_STEP >= ids.shape[1] + NEW
        slots = slots or loop._slots[7]
        assert loop._slots[7] is slots
    assert cache_capacity(CAPACITY_STEP + 1, compiled=True) == 2 * CAPACITY_STEP
    assert cache_capacity(CAPACITY_STEP + 1, compiled=False) == CAPACITY_STEP + 1


@pytest.mark.parametrize("compiled", [False, True])
def test_a_reserved_cache_is_allocated_at_the_first_call(lora_model, monkeypatch, compiled: bool) -> None:
    """``RolloutEngine.reserve`` (the stages pass their longest prompt) sizes a compiled step's cache
    from the first call, so a later, longer prompt finds it; an eager step allocates what it needs."""
    engine = _own(prompt_bucket=8)
    if compiled:
        monkeypatch.setattr(engine.loop, "_step_fn", lambda device: lambda *a: decode_step(*a))
    engine.reserve(CAPACITY_STEP + 3)
    ids, mask = _prompts(rows=7, seed=3)
    assert torch.equal(_generate(engine, lora_model, ids, mask, [29]), _reference(lora_model, ids, mask, [29]))
    bucketed = -(-ids.shape[1] // 8) * 8
    assert engine.loop._capacity == (2 * CAPACITY_STEP if compiled else bucketed + NEW)  # STEP+3 -> STEP+8+NEW


def test_sampled_tokens_repeat_under_a_seed(lora_model) -> None:
    ids, mask = _prompts()
    sampling = {"do_sample": True, "temperature": 0.7, "top_k": 20, "top_p": 0.9}
    for levers in ({}, {"drop_finished": True}):
        engine = _own(**levers)
        runs = []
        for seed in (0, 0, 1):
            torch.manual_seed(seed)
            runs.append(_generate(engine, lora_model, ids, mask, [29], sampling))
        assert engine.last_path == "own"
        assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@pytest.mark.parametrize("rule", [
    SamplingRule(True, 0.7, 0, 1.0), SamplingRule(True, 1.0, 5, 1.0), SamplingRule(True, 1.3, 0, 0.8),
    SamplingRule(True, 0.9, 7, 0.6), SamplingRule(True, 1.0, 1, 0.5),
])
def test_the_filters_are_transformers_warpers(rule: SamplingRule) -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(6, 50, generator=g).round(decimals=1)  # rounded: ties at the top-k edge
    expected = scores
    if rule.temperature != 1.0:
        expected = TemperatureLogitsWarper(rule.temperature)(None, expected)
    if rule.top_k:
        expected = TopKLogitsWarper(rule.top_k)(None, expected)
    if rule.top_p < 1.0:
        expected = TopPLogitsWarper(rule.top_p)(None, expected)
    assert torch.equal(filter_scores(scores, rule), expected)


def test_sampling_draws_from_the_filtered_softmax() -> None:
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -9.0]]).expand(20000, -1)
    picks = pick_tokens(logits, SamplingRule(True, 1.0, 3, 1.0))
    freq = torch.bincount(picks, minlength=5).float() / picks.numel()
    expected = torch.softmax(torch.tensor([2.0, 1.0, 0.0]), 0)
    assert freq[3:].sum() == 0 and torch.allclose(freq[:3], expected, atol=0.015)
    assert torch.equal(pick_tokens(logits[:2], SamplingRule()), torch.tensor([0, 0]))


def test_one_new_token_and_rows_that_all_end_at_the_first(lora_model) -> None:
    ids, mask = _prompts()
    first = _reference(lora_model, ids, mask, None, new=1)
    engine = _own(max_new_tokens=1)
    assert torch.equal(_generate(engine, lora_model, ids, mask, EOS), first)
    assert engine.loop.steps == 0
    everyone_stops = sorted(set(first[:, 0].tolist()))  # every row's first token is a stop token
    engine = _own(drop_finished=True)
    got = _generate(engine, lora_model, ids, mask, everyone_stops)
    assert got.shape == (7, 1) and torch.equal(got, _reference(lora_model, ids, mask, everyone_stops))
    assert engine.loop.steps == 0


def test_mixed_lengths_with_heavy_left_padding(lora_model) -> None:
    ids, mask = _prompts(rows=5, seed=9)
    ids = torch.cat([torch.full((5, 20), PAD), ids], 1)
    mask = torch.cat([torch.zeros(5, 20, dtype=torch.long), mask], 1)
    mask[0, :] = 1  # one row as long as the batch: no padding at all
    ids[0, :20] = torch.arange(5, 25)
    expected = _reference(lora_model, ids, mask, [29])
    assert torch.equal(_generate(_own(prompt_bucket=32, batch_size=2), lora_model, ids, mask, [29]), expected)


@pytest.mark.parametrize("config", [PrefixTuningConfig(num_virtual_tokens=4), PromptTuningConfig(num_virtual_tokens=4)],
                         ids=["prefix", "prompt"])
def test_virtual_tokens_fall_back_to_generate(config) -> None:
    model = get_adapter_model(_base(), config, adapter_name="policy").eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.5)
    ids, mask = _prompts()
    engine = _own(fold_adapter=True, drop_finished=True, prompt_bucket=8)
    reason = engine.own_plan(model, "policy", sampling={"do_sample": False}, eos_token_id=EOS, pad_token_id=PAD,
                             max_new_tokens=NEW)
    assert isinstance(reason, str) and "virtual-token" in reason
    got = _generate(engine, model, ids, mask, EOS)
    assert engine.last_path == "hf"
    assert torch.equal(got, _reference(model, ids, mask, EOS))


def test_what_the_loop_does_not_run_goes_to_generate(lora_model) -> None:
    engine = _own()
    plan = dict(eos_token_id=EOS, pad_token_id=PAD, max_new_tokens=NEW)
    greedy = {"do_sample": False}
    assert isinstance(engine.own_plan(lora_model, "policy", sampling=greedy, **plan), DecodePlan)
    cases = {
        "RepetitionPenalty": dict(sampling={"do_sample": False, "repetition_penalty": 1.3}),
        "generation mode": dict(sampling={"do_sample": False, "num_beams": 2}),
        "per-row inputs": dict(sampling=greedy, row_inputs={"task_ids": torch.zeros(7, dtype=torch.long)}),
        "ZeRO-3": dict(sampling=greedy, generate_kwargs={"synced_gpus": True}),
        "generate keywords": dict(sampling=greedy, generate_kwargs={"min_new_tokens": 3}),
    }
    for words, kwargs in cases.items():
        reason = engine.own_plan(lora_model, "policy", **kwargs, **plan)
        assert isinstance(reason, str) and words.lower() in reason.lower(), (words, reason)
    ids, mask = _prompts()
    got = engine.generate(lora_model, "policy", ids, mask, pad_token_id=PAD, eos_token_id=EOS,
                          sampling={"do_sample": False, "repetition_penalty": 1.3})
    assert engine.last_path == "hf"
    assert got.shape[0] == 7
    assert plan_decode(lora_model.get_base_model(), sampling={"do_sample": True, "top_k": 0}, eos_token_id=None,
                       pad_token_id=PAD, max_new_tokens=4) == DecodePlan(SamplingRule(True), (), PAD, 4)


def test_a_4bit_base_unmerged_and_folded() -> None:
    pytest.importorskip("bitsandbytes")
    from raypeft.adapters import quantize_linear_layers

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = quantize_linear_layers(_base(hidden=128), 4, compute_dtype=torch.float32)  # whole 4-bit blocks
    model = get_adapter_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), adapter_name="policy")
    _trained_like(model)
    model.eval()
    ids, mask = _prompts()
    expected = _reference(model, ids, mask, EOS)  # bitsandbytes repacks its CPU layout on first use
    for levers in ({}, {"fold_adapter": True, "drop_finished": True}):
        engine = _own(**levers)
        assert torch.equal(_generate(engine, model, ids, mask, EOS), expected)
        assert engine.last_path == "own"


def test_pad_token_that_is_also_the_eos(lora_model) -> None:
    ids, mask = _prompts()
    with torch.no_grad():
        expected = lora_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False,
                                       pad_token_id=29, eos_token_id=29)[:, ids.shape[1]:]
    engine = _own(drop_finished=True)
    got = engine.generate(lora_model, "policy", ids, mask, pad_token_id=29, eos_token_id=29,
                          sampling={"do_sample": False})
    assert torch.equal(got, expected)


def test_ppo_rollouts_sample_through_the_own_loop() -> None:
    """``rollout.sample`` (PPO's and GRPO's sampling) with ``decode_loop: own`` from the YAML: the
    policy and the bare base both decode in the own loop; at a temperature so low that sampling is
    greedy, the rollout is the one ``generate`` samples."""
    cfg = parse_config({"adapter": {"r": 4, "lora_alpha": 8}, "ppo": {"rollout_batch_size": 8, "minibatches": 2,
                        "generation": {"max_new_tokens": 6, "temperature": 1e-5, "decode_loop": "own",
                                       "drop_finished": True, "fold_adapter": True}}})
    roles = Roles(_base())
    roles.add(ppo.POLICY, adapter_config(cfg.adapter, cfg.model), trainable=True)
    roles.add_base(ppo.REFERENCE)
    _trained_like(roles.model)
    roles.eval()
    tokenizer = SimpleNamespace(pad_token_id=PAD, eos_token_id=29)
    ids, mask = _prompts(rows=8)
    batch = {"input_ids": ids, "attention_mask": mask}
    hf = cfg.ppo.generation.model_copy(update={"decode_loop": "hf", "drop_finished": False})
    lengths = {}
    for role in (ppo.POLICY, ppo.REFERENCE):
        own_engine = RolloutEngine(cfg.ppo.generation)
        torch.manual_seed(0)
        own = rollout.sample(roles, role, batch, cfg.ppo.generation, tokenizer, engine=own_engine)
        torch.manual_seed(0)
        reference = rollout.sample(roles, role, batch, hf, tokenizer)
        assert own_engine.last_path == "own"
        for name in ("input_ids", "attention_mask", "tokens", "mask", "ended"):
            assert torch.equal(getattr(own, name), getattr(reference, name)), (role, name)
        lengths[role] = set(own.mask.sum(1).tolist())
    assert len(lengths[ppo.POLICY]) > 1  # the policy's rows end at different steps


def test_drop_finished_needs_the_own_loop() -> None:
    with pytest.raises(ValueError, match="needs decode_loop: own"):
        GenerationSpec(drop_finished=True)
    assert GenerationSpec().decode_loop == "hf"


def test_batch_ladder() -> None:
    assert batch_ladder(64) == [64, 32, 16, 8]
    assert batch_ladder(48) == [48, 32, 16, 8]
    assert batch_ladder(7, min_rows=1) == [7, 4, 2, 1]
    assert batch_ladder(4) == [4]


def _mid_decode(loop: DecodeLoop, lm, ids, mask, plan: DecodePlan):
    """The slots of ``loop`` after a call, with their cursors put back to the first decode step."""
    loop.generate(lm, ids, mask, plan)
    s = loop._slots[ids.shape[0]]
    s.step.fill_(1)
    for layer in s.cache.layers:
        layer.cumulative_length.fill_(ids.shape[1] + 1)
    return s


@pytest.mark.parametrize("sampling", [{"do_sample": False}, {"do_sample": True, "temperature": 0.7, "top_k": 20,
                                                            "top_p": 0.9}], ids=["greedy", "sampled"])
def test_the_step_traces_as_one_graph(lora_model, sampling: dict) -> None:
    """What CUDA graphs capture: dynamo sees the whole step (the folded forward, the sampling, the
    cursors) as one graph without a break. Traced on CPU; nothing is compiled."""
    lm = lora_model.get_base_model()
    ids, mask = _prompts()
    plan = plan_decode(lm, sampling=sampling, eos_token_id=[29], pad_token_id=PAD, max_new_tokens=NEW)
    with GenerationCopy(lora_model, "policy").swapped_in():
        s = _mid_decode(DecodeLoop(), lm, ids, mask, plan)
        explained = torch._dynamo.explain(decode_step)(lm, "cache", s, torch.tensor([29]), PAD, plan.rule)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.slow
def test_the_compiled_step_keeps_the_tokens_on_cpu(lora_model, monkeypatch) -> None:
    """The step compiled by inductor (on CPU: no graphs) decodes the same tokens, with dropping,
    and a second call recompiles nothing (minutes: two compilations, one per batch size)."""
    lm = lora_model.get_base_model()
    ids, mask = _prompts(rows=8)
    plan = plan_decode(lm, sampling={"do_sample": False}, eos_token_id=[31, 10, 48], pad_token_id=PAD,
                       max_new_tokens=NEW)
    loop = DecodeLoop(drop_finished=True, check_every=4, min_rows=4)
    compiled = torch.compile(decode_step, dynamic=False)
    monkeypatch.setattr(loop, "_step_fn", lambda device: compiled)
    expected = _reference(lora_model, ids, mask, [31, 10, 48])
    torch._dynamo.reset()
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # the count outlives a reset
    for _ in range(2):
        assert torch.equal(loop.generate(lm, ids, mask, plan), expected)
        assert loop.sizes == [8, 4]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 2


def _logit_gaps(model, ids, mask, generated, eos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced check of generated tokens: per kept token, how far its logit is below the
    position's largest, and its rank (0: the argmax), both ``[N]`` over every row's kept tokens."""
    ro = rollout.pack(ids.cpu(), mask.cpu(), generated.cpu(), eos, PAD)
    with torch.no_grad():
        logits = model(input_ids=ro.input_ids.to(ids.device), attention_mask=ro.attention_mask.to(ids.device)).logits
    picked = rollout.gather_positions(logits[:, :-1].float().cpu(), ro.index)  # [B, T, V]
    chosen = picked.gather(-1, ro.tokens[..., None])  # [B, T, 1]
    kept = ro.mask.bool()
    return (picked.max(-1).values - chosen[..., 0])[kept], (picked > chosen).sum(-1)[kept]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_compiled_step_on_cuda_picks_what_the_model_says() -> None:
    """The CUDA-graphed step (compile) with dropping, fp32 on the GPU, checked against the model
    itself: every greedy token is the argmax of a plain forward over prompt + response (up to
    1e-4 of a logit: GPU kernels round differently with the cache's shape), every top-k sample is
    within the top k; sampled runs repeat under a seed, and later calls replay the same graphs."""
    model = get_adapter_model(_base(), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
                              adapter_name="policy")
    _trained_like(model)
    model = model.cuda().eval()
    ids, mask = (t.cuda() for t in _prompts(rows=16))
    engine = _own(fold_adapter=True, drop_finished=True, compile=True)
    engine.loop.check_every, engine.loop.min_rows = 2, 4
    for _ in range(3):
        greedy = _generate(engine, model, ids, mask, [29])
        assert engine.last_path == "own" and engine.loop._compiled is not None
        gaps, _ = _logit_gaps(model, ids, mask, greedy, 29)
        assert gaps.max() < 1e-4, gaps.max()
    assert len(engine.loop.sizes) > 1  # rows were dropped
    sampling = {"do_sample": True, "temperature": 0.8, "top_k": 5}
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        runs.append(_generate(engine, model, ids, mask, [29], sampling))
    assert torch.equal(runs[0], runs[1])
    _, ranks = _logit_gaps(model, ids, mask, runs[0], 29)
    assert ranks.max() < 5 and ranks.float().mean() > 0  # within the top 5, and not always the argmax
