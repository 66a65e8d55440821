"""``generation.gather_weights`` under DeepSpeed ZeRO-3 (CPU offload, one process over gloo): the
rollout engine samples on weights gathered once per call instead of per layer per token.

Checked against the engine without it (ZeRO-3's per-module gathering, ``synced_gpus``) and against
the plain model before DeepSpeed took it: the same sampled tokens under one seed; no ZeRO-3
fetch during the gathered call, where the other path fetches every layer at every token; the
parameters partitioned again after it, and training steps after it equal to those without it.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("deepspeed")

from raypeft.adapters import LoraConfig  # noqa: E402
from raypeft.pipeline import rollout  # noqa: E402
from raypeft.pipeline.backends import build_backend  # noqa: E402
from raypeft.pipeline.config import GenerationSpec  # noqa: E402
from raypeft.pipeline.deepspeed_configs import resolve  # noqa: E402
from raypeft.pipeline.roles import Roles  # noqa: E402
from raypeft.pipeline.rollout_engine import RolloutEngine  # noqa: E402
from raypeft.pipeline.stages import grpo  # noqa: E402

from test_shared_base_zero3 import one_process_group  # noqa: E402,F401  (the module's gloo group)

VOCAB, NEW = 96, 6
TOKENIZER = SimpleNamespace(pad_token_id=0, eos_token_id=2)


def _roles() -> Roles:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    roles = Roles(base)
    roles.add(grpo.POLICY, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="gaussian"),
              trainable=True)
    roles.add_base(grpo.REFERENCE)
    roles.primary = grpo.POLICY
    return roles.eval()


def _prompts() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (4, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[3, :5] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


def _sample(roles: Roles, engine: RolloutEngine, generate_kwargs: dict) -> torch.Tensor:
    torch.manual_seed(5)
    ro = rollout.sample(roles, grpo.POLICY, _prompts(), engine.spec, TOKENIZER, generate_kwargs, engine)
    return ro.input_ids


def _update(roles: Roles, backend) -> list[float]:
    rows = {"input_ids": torch.randint(3, VOCAB, (4, 10), generator=torch.Generator().manual_seed(2)),
            "attention_mask": torch.ones(4, 10, dtype=torch.long), "index": torch.arange(3, 8).repeat(4, 1)}
    rows["tokens"] = rows["input_ids"][:, 4:9]
    losses = []
    for _ in range(2):
        logp, _ = rollout.policy_terms(roles, grpo.POLICY, rows, temperature=1.0)
        loss = -logp.mean()
        backend.backward(loss)
        backend.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
def test_gathered_generation_samples_the_same_without_per_token_gathers(one_process_group) -> None:  # noqa: F811
    spec = GenerationSpec(max_new_tokens=NEW, gather_weights=True)
    plain_roles = _roles()
    expected = _sample(plain_roles, RolloutEngine(spec), {})  # before DeepSpeed: the reference tokens

    results = {}
    for gather in (False, True):
        roles = _roles()
        ds = resolve("zero3_offload")
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even these tiny tensors
        backend = build_backend(roles, deepspeed_config=ds, micro_batch_size=4, grad_accum=1, world_size=1,
                                lr=1e-2, weight_decay=0.0, scheduler="constant", warmup_steps=0, total_steps=4,
                                max_grad_norm=None, dtype="float32")
        roles.attach_entry(backend.module)
        engine = RolloutEngine(spec.model_copy(update={"gather_weights": gather}))
        engine.gather_with(backend.whole_model)
        coordinator = backend.optimizer.parameter_offload.get_param_coordinator()
        fetches = []
        fetch = coordinator.fetch_sub_module
        coordinator.fetch_sub_module = lambda *a, **k: (fetches.append(1), fetch(*a, **k))[1]
        tokens = _sample(roles, engine, {"synced_gpus": True})
        coordinator.fetch_sub_module = fetch
        assert engine.last_gathered is gather and engine.last_path == "hf"
        partitioned = [p for p in roles.parameters() if hasattr(p, "ds_id")]
        assert partitioned and all(p.data.numel() == 0 for p in partitioned if not p.ds_persist)  # released again
        results[gather] = (tokens, len(fetches), _update(roles, backend))

    assert torch.equal(results[True][0], expected) and torch.equal(results[False][0], expected)
    assert results[True][1] == 0  # no module gathered anything while sampling
    assert results[False][1] >= NEW * 2  # ZeRO-3 fetched (at least) each layer at every token
    assert results[True][2] == pytest.approx(results[False][2], abs=1e-6)  # training after it is unchanged
    assert results[True][2][1] < results[True][2][0]


def test_the_setting_is_off_by_default_and_a_no_op_without_zero3() -> None:
    assert GenerationSpec().gather_weights is False
    roles = _roles()
    engine = RolloutEngine(GenerationSpec(max_new_tokens=3, gather_weights=True))
    entered = []
    engine.gather_with(lambda: entered.append(1) or torch.no_grad())
    _sample(roles, engine, {})
    assert entered == [] and engine.last_gathered is False  # nothing partitioned: nothing to gather
