"""SFT -> reward -> PPO and SFT -> DPO for real: Ray Train workers, the demo base, MLflow on SQLite.

Tiny step counts: these tests check the plumbing (child runs, metrics, registry, checkpoints,
``--stage``, registry URIs as inputs), not learning; ``test_ppo_learning.py`` checks that the
PPO loop raises a reward, and the quickstart figures are in the README.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from raypeft.pipeline.config import load_config
from raypeft.pipeline.roles import VALUE_HEAD_FILE

REPO = Path(__file__).resolve().parents[2]

TINY = [
    "data.max_train_rows=32", "sft.max_steps=2", "sft.batch_size=8", "sft.log_every=1", "sft.checkpoint_every=10",
    "eval.max_rows=4", "eval.max_new_tokens=4",
    "reward.max_steps=4", "reward.batch_size=4", "reward.log_every=1", "reward.checkpoint_every=2",
    "reward.data.max_train_rows=32", "reward.data.max_eval_rows=8",
    "ppo.max_steps=3", "ppo.rollout_batch_size=4", "ppo.minibatches=2", "ppo.ppo_epochs=1",
    "ppo.generation.max_new_tokens=6", "ppo.eval_prompts=4", "ppo.checkpoint_every=2", "ppo.data.max_rows=40",
]


@pytest.fixture(scope="module")
def workflow(tmp_path_factory: pytest.TempPathFactory):
    """One 2-worker run of configs/quickstart.yaml (sft -> reward -> ppo), shared by the tests below."""
    import ray

    from raypeft.pipeline.workflow import run_workflow

    root = tmp_path_factory.mktemp("rlhf")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load_config(REPO / "configs" / "quickstart.yaml", TINY + [
        "scaling.num_workers=2", f"tracking.uri={uri}", f"tracking.artifact_location={(root / 'art').as_uri()}",
        f"output_dir={root / 'out'}", "name=itest"])
    outcomes = run_workflow(cfg, log=lambda _: None)
    yield {"cfg": cfg, "uri": uri, "root": root, "outcomes": {o.stage: o for o in outcomes}}
    if ray.is_initialized():
        ray.shutdown()


@pytest.mark.slow
def test_workflow_runs_each_stage_as_a_child_run_and_registers_it(workflow) -> None:
    client = MlflowClient(workflow["uri"])
    outcomes = workflow["outcomes"]
    assert list(outcomes) == ["sft", "reward", "ppo"]
    runs = {stage: client.get_run(o.run_id) for stage, o in outcomes.items()}
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs.values()}
    assert len(parents) == 1
    parent = client.get_run(parents.pop())
    assert parent.info.status == "FINISHED" and parent.data.tags["raypeft.stages"] == "sft,reward,ppo"
    for stage, run in runs.items():
        assert run.info.status == "FINISHED" and run.data.tags["raypeft.stage"] == stage
        version = client.get_model_version(f"itest-{stage}", str(outcomes[stage].model_version))
        assert version.tags["stage"] == stage and version.tags["method"] == "lora" and version.tags["r"] == "8"
        assert version.tags["base_model"] == "demo" and version.run_id == run.info.run_id
    out = workflow["cfg"].output_path()
    assert runs["reward"].data.tags["raypeft.input.init"] == str(out / "sft" / "adapter")
    assert runs["ppo"].data.tags["raypeft.input.reward"] == str(out / "reward" / "adapter")
    assert runs["ppo"].data.tags["raypeft.input.policy"] == str(out / "sft" / "adapter")


@pytest.mark.slow
def test_reward_stage_metrics_and_value_head(workflow) -> None:
    client = MlflowClient(workflow["uri"])
    o = workflow["outcomes"]["reward"]
    metrics = client.get_run(o.run_id).data.metrics
    for key in ("train_loss", "train_accuracy", "train_margin", "eval_accuracy", "eval_margin", "eval_loss",
                "eval_accuracy_before", "eval_accuracy_after", "tokens_per_s", "peak_rss_mib/rank0",
                "peak_rss_mib/rank1", "trainable_params", "adapter_size_bytes"):
        assert key in metrics, key
    assert [m.step for m in client.get_metric_history(o.run_id, "train_loss")] == [1, 2, 3, 4]
    assert sorted(m.step for m in client.get_metric_history(o.run_id, "eval_accuracy")) == [0, 4]
    assert metrics["eval_accuracy_before"] == 0.0  # a zero head scores every side alike: no pair is won
    files = {p.name for p in o.adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", VALUE_HEAD_FILE} <= files
    artifacts = {a.path for a in client.list_artifacts(o.run_id, "adapter")}
    assert f"adapter/{VALUE_HEAD_FILE}" in artifacts


@pytest.mark.slow
def test_ppo_stage_metrics_roles_and_checkpoint(workflow) -> None:
    client = MlflowClient(workflow["uri"])
    o = workflow["outcomes"]["ppo"]
    metrics = client.get_run(o.run_id).data.metrics
    per_step = ("reward_mean", "reward_std", "kl", "kl_coef", "entropy", "clip_fraction", "value_loss",
                "policy_loss", "approx_kl", "value_clip_fraction", "response_length")
    for key in per_step:
        assert [m.step for m in client.get_metric_history(o.run_id, key)] == [1, 2, 3], key
    for key in ("tokens_per_s", "peak_rss_mib"):  # per step, and the stage's overall figure at the end
        assert {m.step for m in client.get_metric_history(o.run_id, key)} == {1, 2, 3}, key
    for key in ("eval_reward_before", "eval_reward_after", "eval_kl_after", "rougeL_before", "rougeL_after",
                "peak_rss_mib/rank1", "adapter_size_bytes"):
        assert key in metrics, key
    # One copy of the base in every worker: all base parameters present, nothing else but roles.
    assert metrics["base_params"] > 0 and metrics["base_params_missing"] == 0
    assert metrics["non_base_non_role_params"] == 0
    assert metrics["kl_coef"] > 0 and metrics["eval_kl_before"] == 0.0  # policy starts as the reference
    # The published adapter is the policy alone (PEFT layout); checkpoints also hold the critic.
    assert {p.name for p in o.adapter_dir.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    ckpts = sorted(p for p in workflow["cfg"].output_path().glob("ray/ppo-*/checkpoint_*") if p.is_dir())
    assert ckpts and all((c / "roles" / "critic" / VALUE_HEAD_FILE).is_file() for c in ckpts)
    assert json.loads((ckpts[-1] / "checkpoint.json").read_text())["step"] == 3


@pytest.mark.slow
def test_single_stage_reuses_earlier_outputs(workflow) -> None:
    """``raypeft run --stage ppo``: inputs come from the folders the earlier run published."""
    from raypeft.pipeline.workflow import run_workflow

    cfg = workflow["cfg"].model_copy(update={"scaling": workflow["cfg"].scaling.model_copy(update={"num_workers": 1})})
    (again,) = run_workflow(cfg, ["ppo"], log=lambda _: None)
    client = MlflowClient(workflow["uri"])
    assert again.model_version == workflow["outcomes"]["ppo"].model_version + 1
    run = client.get_run(again.run_id)
    assert run.info.status == "FINISHED"
    parent = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert parent.data.tags["raypeft.stages"] == "ppo"
    assert run.data.tags["raypeft.input.critic"] == str(cfg.output_path() / "reward" / "adapter")


@pytest.mark.slow
def test_dpo_stage_from_a_registry_uri(workflow) -> None:
    from raypeft.pipeline.workflow import run_workflow

    sft_version = workflow["outcomes"]["sft"].model_version
    cfg = load_config(REPO / "configs" / "quickstart-dpo.yaml", TINY + [
        "stages=[dpo]", f"dpo.policy_init=models:/itest-sft/{sft_version}", "dpo.loss_type=ipo",
        "dpo.max_steps=3", "dpo.batch_size=4", "dpo.log_every=1", "dpo.checkpoint_every=2",
        "dpo.data.max_train_rows=32", "dpo.data.max_eval_rows=8", "eval.rouge=false", "scaling.num_workers=1",
        f"tracking.uri={workflow['uri']}", f"output_dir={workflow['root'] / 'out'}", "name=itest"])
    (o,) = run_workflow(cfg, log=lambda _: None)
    client = MlflowClient(workflow["uri"])
    run = client.get_run(o.run_id)
    metrics = run.data.metrics
    for key in ("train_loss", "train_accuracy", "train_margin", "reward_chosen", "reward_rejected",
                "eval_accuracy_before", "eval_accuracy_after", "eval_margin_after", "eval_logp_accuracy_after"):
        assert key in metrics, key
    assert [m.step for m in client.get_metric_history(o.run_id, "train_loss")] == [1, 2, 3]
    assert metrics["eval_margin_before"] == 0.0  # the reference is a frozen copy of the starting policy
    assert metrics["reference_is_base"] == 0.0
    assert run.data.tags["raypeft.input.policy"] == run.data.tags["raypeft.input.reference"]
    assert client.get_model_version("itest-dpo", str(o.model_version)).tags["stage"] == "dpo"


@pytest.mark.slow
def test_ppo_resumes_from_a_checkpoint(workflow) -> None:
    """A PPO checkpoint (policy + critic + optimiser + KL state) restarts the loop where it stopped."""
    from raypeft.pipeline import launcher, tracking
    from raypeft.pipeline.adapter_inputs import resolve_stage_inputs
    from raypeft.pipeline.stages.ppo import train_loop

    cfg = workflow["cfg"].model_copy(update={"scaling": workflow["cfg"].scaling.model_copy(update={"num_workers": 1})})
    first = workflow["outcomes"]["ppo"]
    ckpts = [p for p in cfg.output_path().glob("ray/ppo-*/checkpoint_*") if p.is_dir()]
    (mid,) = [p for p in ckpts if json.loads((p / "checkpoint.json").read_text())["step"] == 2
              and first.run_id in str(p)]
    client = MlflowClient(workflow["uri"])
    experiment = client.get_run(first.run_id).info.experiment_id
    run_id = tracking.start_run(experiment, "ppo-resumed")
    payload = {"config": cfg.model_dump(mode="json", by_alias=True), "run_id": run_id,
               "tracking_uri": workflow["uri"], "inputs": resolve_stage_inputs(cfg, ["ppo"])["ppo"], "resume": str(mid)}
    result = launcher.fit(train_loop, payload, cfg, run_name=f"ppo-resumed-{run_id}")
    assert result.metrics["step"] == 3
    assert [m.step for m in client.get_metric_history(run_id, "reward_mean")] == [3]  # only the missing step
    before = client.get_run(first.run_id).data.metrics["eval_reward_before"]
    assert client.get_run(run_id).data.metrics["eval_reward_before"] == before  # restored, not re-measured
