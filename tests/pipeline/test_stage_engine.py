"""The pieces that let every stage train through one backend: role outputs through one entry,
per-role clipping, lockstep evaluation shards and the resource figures."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from raypeft.pipeline import engine
from raypeft.pipeline.backends import TorchBackend
from raypeft.pipeline.config import parse_config
from raypeft.pipeline.modeling import adapter_config
from raypeft.pipeline.resources import Throughput
from raypeft.pipeline.roles import Roles
from raypeft.pipeline.stages import common, ppo


@pytest.fixture()
def roles() -> Roles:
    import transformers

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)).eval()
    cfg = parse_config({"adapter": {"r": 4, "lora_alpha": 8, "init_lora_weights": "gaussian"}})
    fresh = adapter_config(cfg.adapter, cfg.model)
    out = Roles(base)
    out.add(ppo.POLICY, fresh, trainable=True)
    out.add_base(ppo.REFERENCE)
    out.add(ppo.CRITIC, fresh, trainable=True, value_head="zero")
    out.primary = ppo.POLICY
    with torch.no_grad():  # LoRA starts as the identity: move it so the policy differs from the reference
        for param in out.trainable_parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return out


def _batch():
    ids = torch.randint(1, 40, (2, 6), generator=torch.Generator().manual_seed(3))
    return ids, torch.ones_like(ids)


def test_one_run_gives_what_separate_calls_give_and_goes_through_the_entry(roles: Roles) -> None:
    ids, mask = _batch()
    logits, values, ref = roles.run(ids, mask, ("logits", ppo.POLICY), ("values", ppo.CRITIC),
                                    ("logits", ppo.REFERENCE))
    assert torch.equal(logits, roles.logits(ppo.POLICY, ids, mask))
    assert torch.equal(values, roles.values(ppo.CRITIC, ids, mask))
    assert torch.equal(ref, roles.logits(ppo.REFERENCE, ids, mask)) and not torch.equal(ref, logits)
    with pytest.raises(ValueError, match="unknown role output 'hidden'"):
        roles.run(ids, mask, ("hidden", ppo.POLICY))

    calls = []

    def entry(input_ids, attention_mask, requests):  # what a DeepSpeed engine's forward receives
        calls.append(requests)
        return roles(input_ids, attention_mask, requests=requests)

    roles.attach_entry(entry)
    roles.values(ppo.CRITIC, ids, mask)
    rows = {"input_ids": ids, "attention_mask": mask, "index": torch.arange(4).repeat(2, 1), "tokens": ids[:, 1:5]}
    ppo.policy_and_critic(roles, rows, temperature=1.0)
    assert calls == [(("values", ppo.CRITIC),), (("logits", ppo.POLICY), ("values", ppo.CRITIC))]
    roles.attach_entry(roles)  # the module itself: no entry kept (and no reference cycle)
    assert roles._entry == []


def test_torch_backend_clips_each_role_on_its_own(roles: Roles) -> None:
    policy, critic = roles.trainable_parameters(ppo.POLICY), roles.trainable_parameters(ppo.CRITIC)
    backend = TorchBackend(roles, lr=1e-3, weight_decay=0.0, scheduler="constant", warmup_steps=0, total_steps=1,
                           max_grad_norm=1.0, clip_groups=[policy, critic])
    for params, scale in ((policy, 1e-3), (critic, 1e3)):  # a tiny policy gradient next to a huge critic one
        for p in params:
            p.grad = torch.full_like(p, scale)
    norms = {}
    original = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm):
        params = list(params)
        out = original(params, max_norm)
        norms[len(norms)] = torch.linalg.vector_norm(torch.cat([p.grad.reshape(-1) for p in params])).item()
        return out

    torch.nn.utils.clip_grad_norm_, saved = spy, torch.nn.utils.clip_grad_norm_
    try:
        backend.step()
    finally:
        torch.nn.utils.clip_grad_norm_ = saved
    assert len(norms) == 2
    assert norms[0] < 1.0  # the policy's small gradient is left as it was, not scaled down by the critic's
    assert norms[1] == pytest.approx(1.0, rel=1e-4)


def test_eval_shard_pads_only_in_lockstep(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = engine.Worker(rank=1, world_size=2, device=torch.device("cpu"))
    assert common.eval_shard(7, worker, 2, None) == [1, 3, 5]
    loose = SimpleNamespace(lockstep=False)
    assert common.eval_shard(7, worker, 2, loose) == [1, 3, 5]
    # Rank 0 holds 4 rows, rank 1 holds 3: in lockstep both run 2 batches of 2.
    monkeypatch.setattr(engine, "all_gather", lambda n: [4, n])
    assert common.eval_shard(7, worker, 2, SimpleNamespace(lockstep=True)) == [1, 3, 5, None]


def test_resource_figures_per_worker_and_engine() -> None:
    worker = engine.Worker(rank=0, world_size=1, device=torch.device("cpu"))
    meter = Throughput()
    meter.add(1000)
    figures = common.resource_figures(worker, meter, SimpleNamespace(describe=lambda: {"engine": "deepspeed",
                                                                                        "zero_stage": 3}))
    assert figures["peak_rss_mib"] > 0 and figures["peak_rss_mib/rank0"] == figures["peak_rss_mib"]
    assert figures["tokens_per_s"] == figures["tokens_per_s_per_worker"] == figures["tokens_per_s/rank0"] > 0
    assert figures["workers"] == 1.0 and figures["zero_stage"] == 3.0
    plain = SimpleNamespace(describe=lambda: {"engine": "torch"})
    assert "zero_stage" not in common.resource_figures(worker, meter, plain)
    if torch.cuda.is_available():
        assert figures["peak_gpu_allocated_mib"] >= 0 and figures["peak_gpu_reserved_mib"] >= 0
