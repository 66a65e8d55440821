"""The real stages under DeepSpeed in Ray Train: 2 gloo workers, the demo base, MLflow on SQLite.

``deepspeed: zero3_offload`` / ``zero3`` in the YAML: the SFT loss curve must follow the plain
PyTorch run on the same data (ZeRO-3 partitions the work, not the arithmetic), held-out
generation must keep the workers in lockstep (uneven shards, ``synced_gpus``), and the reward
and PPO stages -- roles on one base, one engine -- must train, checkpoint and publish PEFT
adapters gathered from the partitions.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from raypeft.adapters.serialization import load_adapter_weights
from raypeft.pipeline.config import load_config
from raypeft.pipeline.roles import VALUE_HEAD_FILE

pytest.importorskip("deepspeed")

REPO = Path(__file__).resolve().parents[2]

BASE = [
    "data.max_train_rows=32", "sft.max_steps=3", "sft.batch_size=4", "sft.log_every=1", "sft.checkpoint_every=2",
    "sft.lr_scheduler=constant", "sft.warmup_steps=0",
    "eval.max_rows=5", "eval.max_new_tokens=4", "eval.batch_size=2",  # 3 + 2 rows: uneven shards
    "reward.init_from=null", "reward.max_steps=3", "reward.batch_size=4", "reward.log_every=1",
    "reward.checkpoint_every=2", "reward.data.max_train_rows=32", "reward.data.max_eval_rows=5",
    "ppo.policy_init=null", "ppo.max_steps=2", "ppo.rollout_batch_size=4", "ppo.minibatches=2", "ppo.ppo_epochs=1",
    "ppo.generation.max_new_tokens=5", "ppo.eval_prompts=3", "ppo.checkpoint_every=1", "ppo.data.max_rows=24",
    "scaling.num_workers=2",
]


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory):
    import ray

    path = tmp_path_factory.mktemp("ds")
    yield path
    if ray.is_initialized():
        ray.shutdown()


def _run(root: Path, name: str, overrides: list[str]):
    from raypeft.pipeline.workflow import run_workflow

    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load_config(REPO / "configs" / "quickstart.yaml", BASE + overrides + [
        f"tracking.uri={uri}", f"tracking.artifact_location={(root / 'art').as_uri()}",
        f"output_dir={root / 'out'}", f"name={name}"])
    outcomes = {o.stage: o for o in run_workflow(cfg, log=lambda _: None)}
    return cfg, MlflowClient(uri), outcomes


def _losses(client: MlflowClient, run_id: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, "train_loss"), key=lambda m: m.step)]


def _max_difference(a: Path, b: Path) -> float:
    wa, wb = load_adapter_weights(a), load_adapter_weights(b)
    assert wa.keys() == wb.keys() and all(wa[k].shape == wb[k].shape for k in wa)
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


@pytest.mark.slow
def test_sft_under_zero3_offload_follows_the_torch_run(root: Path) -> None:
    _, client, plain = _run(root, "sft-torch", ["stages=[sft]", "eval.rouge=false"])
    # the loss without full logits (labelled positions through the partitioned LM head, in checkpointed
    # chunks) under ZeRO-3 offload, against the model's own loss without DeepSpeed
    cfg, _, sharded = _run(root, "sft-zero3", ["stages=[sft]", "deepspeed=zero3_offload", "sft.chunked_loss=true"])
    p, s = plain["sft"], sharded["sft"]
    assert len(_losses(client, s.run_id)) == 3
    assert _losses(client, s.run_id) == pytest.approx(_losses(client, p.run_id), abs=1e-3)
    assert _max_difference(p.adapter_dir, s.adapter_dir) < 1e-3  # PEFT files gathered from the partitions

    run = client.get_run(s.run_id)
    tags, metrics = run.data.tags, run.data.metrics
    assert (tags["raypeft.engine"], tags["raypeft.zero_stage"]) == ("deepspeed", "3")
    assert (tags["raypeft.offload_optimizer"], tags["raypeft.offload_param"]) == ("cpu", "cpu")
    assert tags["raypeft.deepspeed_config"] == "zero3_offload"
    assert run.data.params["deepspeed.zero_optimization.stage"] == "3"
    assert client.get_run(p.run_id).data.tags["raypeft.engine"] == "torch"
    assert metrics["zero_stage"] == 3.0 and metrics["workers"] == 2.0
    assert metrics["chunked_loss"] == 1.0 and client.get_run(p.run_id).data.metrics["chunked_loss"] == 0.0
    for key in ("peak_rss_mib", "peak_rss_mib/rank0", "peak_rss_mib/rank1", "tokens_per_s", "tokens_per_s/rank1",
                "tokens_per_s_per_worker", "rougeL_before", "rougeL_after"):
        assert key in metrics, key
    # Every checkpoint: the adapter (rank 0) and one optimiser partition per rank.
    ckpts = sorted(p for p in cfg.output_path().glob("ray/sft-*/checkpoint_*") if p.is_dir())
    assert len(ckpts) == 2
    for ckpt in ckpts:
        assert (ckpt / "adapter" / "adapter_model.safetensors").is_file()
        assert sum("optim_states" in f.name for f in (ckpt / "deepspeed" / "state").iterdir()) == 2


@pytest.mark.slow
def test_reward_and_ppo_under_zero3(root: Path) -> None:
    _, client, plain = _run(root, "rm-torch", ["stages=[reward]"])
    # packed pairs under ZeRO-3 against padded pairs without it: the packed forward (position ids, no
    # mask) goes through the DeepSpeed engine and reduces to the same per-side scores and losses
    cfg, _, outcomes = _run(root, "rl-zero3", ["stages=[reward, ppo]", "deepspeed=zero3", "eval.rouge=false",
                                               "data.packing=true"])

    reward = outcomes["reward"]
    assert _losses(client, reward.run_id) == pytest.approx(_losses(client, plain["reward"].run_id), abs=1e-3)
    assert _max_difference(plain["reward"].adapter_dir, reward.adapter_dir) < 1e-3
    assert (reward.adapter_dir / VALUE_HEAD_FILE).is_file()
    metrics = client.get_run(reward.run_id).data.metrics
    assert metrics["zero_stage"] == 3.0 and "eval_accuracy_after" in metrics

    ppo = outcomes["ppo"]
    run = client.get_run(ppo.run_id)
    assert run.data.tags["raypeft.zero_stage"] == "3" and run.data.tags["raypeft.offload_param"] == "none"
    for key in ("reward_mean", "kl", "policy_loss", "value_loss"):
        assert sorted(m.step for m in client.get_metric_history(ppo.run_id, key)) == [1, 2], key
    assert {m.step for m in client.get_metric_history(ppo.run_id, "peak_rss_mib")} == {1, 2}  # + the final figure
    assert run.data.metrics["base_params_missing"] == 0 and run.data.metrics["non_base_non_role_params"] == 0
    assert run.data.metrics["eval_kl_before"] == 0.0  # the fresh policy is the bare base: the reference
    assert "eval_reward_after" in run.data.metrics and run.data.metrics["zero_stage"] == 3.0
    assert {p.name for p in ppo.adapter_dir.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    ckpts = sorted(p for p in cfg.output_path().glob("ray/ppo-*/checkpoint_*") if p.is_dir())
    assert len(ckpts) == 2
    for ckpt in ckpts:
        assert (ckpt / "roles" / "critic" / VALUE_HEAD_FILE).is_file()
        assert sum("optim_states" in f.name for f in (ckpt / "deepspeed" / "state").iterdir()) == 2
