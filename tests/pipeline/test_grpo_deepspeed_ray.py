"""The grpo stage under DeepSpeed ZeRO-3 in Ray Train: 2 gloo workers, the demo base.

ZeRO-3 gathers parameters in every forward, so both workers must run as many forwards and
``generate`` calls as each other: sampling with ``synced_gpus`` (or on weights gathered once per
call, ``generation.gather_weights``), minibatches whose kept rows differ
per worker (zero-variance groups filtered), held-out prompts that do not split evenly. The stage
must train, checkpoint and publish a PEFT adapter gathered from the partitions.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from raypeft.adapters.serialization import load_adapter_weights
from raypeft.pipeline.config import load_config

pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[2]


def _run(cfg):
    """The one-stage workflow in a fresh local Ray, shut down after."""
    import ray

    from raypeft.pipeline.workflow import run_workflow

    try:
        (outcome,) = run_workflow(cfg, log=lambda _: None)
    finally:
        if ray.is_initialized():
            ray.shutdown()
    return outcome


@pytest.mark.slow
@pytest.mark.parametrize("gather", [False, True], ids=["synced-full-logits", "gathered-chunked"])
def test_grpo_trains_under_zero3_with_uneven_work_per_worker(tmp_path: Path, gather: bool) -> None:
    """``gathered-chunked``: ``generation.gather_weights``, each worker samples on weights gathered
    once per call, without ``synced_gpus`` (responses ending at different tokens on the two workers
    must not leave one waiting on a collective the other never calls), and ``chunked_loss``: the
    log-probabilities through the partitioned LM head in re-entrant-checkpointed chunks."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(REPO / "configs" / "quickstart-grpo.yaml", [
        "stages=[grpo]", "deepspeed=zero3", "grpo.policy_init=null", "grpo.max_steps=2", "grpo.prompts_per_step=2",
        "grpo.num_generations=3", "grpo.minibatches=2", "grpo.generation.max_new_tokens=5", "grpo.kl.coef=0.05",
        "grpo.filter_zero_variance=true", "grpo.eval_prompts=3", "grpo.checkpoint_every=1", "grpo.data.max_rows=24",
        "grpo.lr_scheduler=constant", "eval.max_rows=5", "eval.max_new_tokens=4", "eval.batch_size=2",
        "scaling.num_workers=2", f"tracking.uri={uri}", f"tracking.artifact_location={(tmp_path / 'art').as_uri()}",
        f"output_dir={tmp_path / 'out'}", "name=gds", f"grpo.generation.gather_weights={str(gather).lower()}", f"grpo.chunked_loss={str(gather).lower()}"])
    o = _run(cfg)
    client = MlflowClient(uri)
    run = client.get_run(o.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["raypeft.zero_stage"] == "3"
    metrics = run.data.metrics
    assert metrics["zero_stage"] == 3.0 and metrics["chunked_loss"] == float(gather)
    for key in ("reward_mean", "group_reward_std", "kl", "zero_variance_group_fraction"):
        assert [m.step for m in client.get_metric_history(o.run_id, key)] == [1, 2], key
    for key in ("eval_reward_before", "eval_reward_after", "eval_kl_after", "rougeL_before", "rougeL_after"):
        assert key in metrics, key
    weights = load_adapter_weights(o.adapter_dir)  # whole tensors, gathered from the partitions
    assert weights and all(t.numel() > 0 for t in weights.values())
    assert any(float(t.abs().sum()) > 0 for k, t in weights.items() if "lora_B" in k)  # it trained


@pytest.mark.slow
def test_grpo_on_a_4bit_base_under_zero2(tmp_path: Path) -> None:
    """Policy and reference as adapters over one bitsandbytes NF4 base, ZeRO-2 on 2 gloo workers: the
    stage trains, and the published adapter loads onto a fresh 4-bit base."""
    import bitsandbytes as bnb
    import torch

    from raypeft.adapters import AdapterModel
    from raypeft.pipeline.modeling import load_base_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(REPO / "configs" / "quickstart-grpo.yaml", [
        "stages=[grpo]", "deepspeed=zero2", "model.quantization={bits: 4, bnb_4bit_compute_dtype: float32}",
        "grpo.policy_init=null", "grpo.max_steps=2", "grpo.prompts_per_step=2", "grpo.num_generations=3",
        "grpo.generation.max_new_tokens=5", "grpo.kl.coef=0.05", "grpo.eval_prompts=2", "grpo.checkpoint_every=1",
        "grpo.data.max_rows=16", "eval.rouge=false", "scaling.num_workers=2", f"tracking.uri={uri}",
        f"tracking.artifact_location={(tmp_path / 'art').as_uri()}", f"output_dir={tmp_path / 'out'}", "name=g4"])
    o = _run(cfg)
    client = MlflowClient(uri)
    run = client.get_run(o.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["raypeft.zero_stage"] == "2"
    assert [m.step for m in client.get_metric_history(o.run_id, "kl")] == [1, 2]
    base = load_base_model(cfg.model)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    weights = load_adapter_weights(o.adapter_dir)
    assert any(float(t.abs().sum()) > 0 for k, t in weights.items() if "lora_B" in k)  # it trained
    loaded = AdapterModel.from_pretrained(base, str(o.adapter_dir))
    with torch.no_grad():
        assert torch.isfinite(loaded(input_ids=torch.tensor([[1, 5, 9, 12]])).logits).all()
