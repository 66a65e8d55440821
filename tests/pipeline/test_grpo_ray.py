"""sft -> reward -> grpo for real: 2 Ray Train workers, the demo base, MLflow on SQLite; and a grpo
stage whose worker is killed mid-run resumes without losing or doubling a step.

Tiny step counts and lengths: these check the plumbing (groups whole on every worker, metrics,
registry, checkpoints, resume), not learning; configs/quickstart-grpo.yaml's figures are in the
issue notes and README.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from raypeft.pipeline.config import load_config

REPO = Path(__file__).resolve().parents[2]
P, G = 2, 3  # prompts per worker per step, completions per prompt

RECORDER = '''
import json, os

def record(prompts, completions, log, **columns):
    """Writes the prompts of every call (the layout the stage hands reward functions), scores length."""
    with open(log, "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "prompts": prompts, "columns": sorted(columns)}) + "\\n")
    return [min(len(c.split()), 10) / 10 for c in completions]
'''

TINY = [
    "data.max_train_rows=32", "sft.max_steps=2", "sft.batch_size=8", "sft.log_every=1", "sft.checkpoint_every=10",
    "eval.max_rows=4", "eval.max_new_tokens=4",
    "reward.max_steps=2", "reward.batch_size=4", "reward.log_every=1", "reward.data.max_train_rows=16",
    "reward.data.max_eval_rows=8",
    "grpo.max_steps=3", f"grpo.prompts_per_step={P}", f"grpo.num_generations={G}", "grpo.generation.max_new_tokens=6",
    "grpo.eval_prompts=4", "grpo.checkpoint_every=2", "grpo.minibatches=2", "grpo.update_epochs=2",
    "grpo.kl.coef=0.05", "grpo.reward_adapter=reward", "grpo.reward_adapter_weight=0.1",
]


def _rewards(root: Path) -> list[str]:
    (root / "recorder.py").write_text(RECORDER)
    log = root / "calls.jsonl"
    return [f"grpo.rewards=[{{function: rouge_l, weight: 1.0, kwargs: {{reference_column: summary}}}}, "
            f"{{function: '{root / 'recorder.py'}:record', weight: 0.5, kwargs: {{log: '{log}'}}}}]"]


@pytest.fixture(scope="module")
def workflow(tmp_path_factory: pytest.TempPathFactory):
    """One 2-worker run of configs/quickstart-grpo.yaml grown to sft -> reward -> grpo."""
    import ray

    from raypeft.pipeline.workflow import run_workflow

    root = tmp_path_factory.mktemp("grpo")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load_config(REPO / "configs" / "quickstart-grpo.yaml", TINY + _rewards(root) + [
        "stages=[sft, reward, grpo]", "scaling.num_workers=2", f"tracking.uri={uri}",
        f"tracking.artifact_location={(root / 'art').as_uri()}", f"output_dir={root / 'out'}", "name=gtest"])
    outcomes = run_workflow(cfg, log=lambda _: None)
    yield {"cfg": cfg, "uri": uri, "root": root, "outcomes": {o.stage: o for o in outcomes}}
    if ray.is_initialized():
        ray.shutdown()


@pytest.mark.slow
def test_groups_stay_whole_on_every_worker(workflow) -> None:
    calls = [json.loads(line) for line in (workflow["root"] / "calls.jsonl").read_text().splitlines()]
    training = [c for c in calls if len(c["prompts"]) == P * G]
    assert len(training) == 3 * 2  # one call per step per worker
    assert len({c["pid"] for c in training}) == 2
    for call in training:
        prompts = call["prompts"]
        groups = [prompts[i:i + G] for i in range(0, P * G, G)]
        assert all(len(set(group)) == 1 for group in groups), prompts  # G completions of one prompt, together
        assert len({group[0] for group in groups}) == P, prompts  # P different prompts
        assert call["columns"] == ["summary"]  # the row's other columns, under their names
    held_out = [c for c in calls if len(c["prompts"]) != P * G]
    assert held_out and all(len(set(c["prompts"])) == len(c["prompts"]) for c in held_out)  # one each


@pytest.mark.slow
def test_grpo_metrics_registry_and_checkpoints(workflow) -> None:
    client = MlflowClient(workflow["uri"])
    o = workflow["outcomes"]["grpo"]
    run = client.get_run(o.run_id)
    metrics = run.data.metrics
    per_step = ("reward/rouge_l/mean", "reward/rouge_l/std", "reward/record/mean", "reward/reward_model/mean",
                "reward/total/mean", "reward/total/std", "reward_mean", "group_reward_std",
                "zero_variance_group_fraction", "skipped_group_fraction", "kl", "entropy", "completion_length",
                "clip_fraction_low", "clip_fraction_high", "approx_kl", "loss", "learning_rate")
    for key in per_step:
        assert [m.step for m in client.get_metric_history(o.run_id, key)] == [1, 2, 3], key
    for key in ("tokens_per_s", "peak_rss_mib"):  # per step, and the stage's overall figure at the end
        assert {m.step for m in client.get_metric_history(o.run_id, key)} == {1, 2, 3}, key
    for key in ("eval_reward_before", "eval_reward_after", "eval_reward/rouge_l_before", "eval_reward/rouge_l_after",
                "eval_reward/reward_model_after", "eval_kl_after", "rougeL_before", "rougeL_after",
                "peak_rss_mib/rank1", "adapter_size_bytes", "trainable_params"):
        assert key in metrics, key
    assert metrics["eval_kl_before"] == 0.0  # the policy starts as its reference
    assert metrics["base_params"] > 0 and metrics["base_params_missing"] == 0
    assert metrics["non_base_non_role_params"] == 0  # policy, reference, reward: no critic, no copy of the base
    assert metrics["updates"] > 0
    assert run.data.tags["raypeft.input.reward"] == str(workflow["cfg"].output_path() / "reward" / "adapter")
    version = client.get_model_version("gtest-grpo", str(o.model_version))
    assert version.tags["stage"] == "grpo" and version.run_id == o.run_id
    assert {p.name for p in o.adapter_dir.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    ckpts = sorted(p for p in workflow["cfg"].output_path().glob("ray/grpo-*/checkpoint_*") if p.is_dir())
    assert [json.loads((c / "checkpoint.json").read_text())["step"] for c in ckpts] == [2, 3]


def _train_workers() -> list:
    """This test's Ray Train workers (descendants of this process), never another run's."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if (" ".join(proc.info.get("cmdline") or []).startswith("ray::RayTrainWorker")
                    and any(p.pid == os.getpid() for p in proc.parents())):
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.mark.slow
def test_a_killed_worker_resumes_without_losing_or_doubling_steps(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Same pattern as test_faults_ray.py, for the grpo stage from a fresh policy (no SFT needed)."""
    from raypeft.pipeline.workflow import run_workflow

    steps = 12
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(REPO / "configs" / "quickstart-grpo.yaml", [
        "stages=[grpo]", "grpo.policy_init=null", f"grpo.max_steps={steps}", f"grpo.prompts_per_step={P}",
        f"grpo.num_generations={G}", "grpo.generation.max_new_tokens=6", "grpo.eval_prompts=4",
        "grpo.checkpoint_every=3", "grpo.data.max_rows=40", "eval.rouge=false", "scaling.num_workers=2",
        "failure.max_failures=2", f"tracking.uri={uri}", f"output_dir={tmp_path / 'out'}", "name=gfaults",
    ])
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["result"] = run_workflow(cfg, log=lambda _: None)
        except BaseException as exc:  # surfaced by the assertions below
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    killed = None
    deadline = time.time() + 300
    while time.time() < deadline and thread.is_alive():
        if any(p.is_dir() for p in cfg.output_path().glob("ray/grpo-*/checkpoint_*")):
            workers = _train_workers()
            if workers:
                killed = workers[-1]
                os.kill(killed.pid, signal.SIGKILL)
                break
        time.sleep(0.05)
    thread.join(timeout=500)
    assert killed is not None, "the stage finished (or never checkpointed) before a worker could be killed"
    assert "error" not in outcome, outcome.get("error")
    (stage,) = outcome["result"]
    import ray

    ray.shutdown()

    client = MlflowClient(uri)
    run = client.get_run(stage.run_id)
    assert run.info.status == "FINISHED"
    assert stage.metrics["step"] == steps
    for key in ("reward_mean", "group_reward_std"):
        history = sorted(m.step for m in client.get_metric_history(stage.run_id, key))
        assert history == list(range(1, steps + 1)), (key, history)  # none lost, none doubled
    parent = run.data.tags["mlflow.parentRunId"]
    assert len(client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")) == 1
    # Measured once before training (restored from the checkpoint after the restart, not re-measured).
    assert [m.step for m in client.get_metric_history(stage.run_id, "eval_reward")] == [0, steps]
