"""A real sweep on Ray Tune + Ray Train V2: parent/child MLflow runs, a failed and an early-stopped
trial that do not stop the sweep, the best adapter registered with its alias, summary artifacts.

Three trials, two at a time, on the embedded demo (trial 2 starts only when trial 1 has failed,
by which time trial 0 has long passed ASHA's first rung, so ASHA's decision is settled):
  0. LoRA, lr 1e-2: trains normally; the best trial;
  1. LoRA, lr 1e30: the loss turns NaN; the trial fails (in Tune and in MLflow);
  2. prompt tuning with 16 random virtual tokens and lr 1e-8: its train_loss at step 2 is far above
     trial 0's, so ASHA (grace period 2 steps) stops it at its first rung.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from raypeft import cli
from raypeft.pipeline import model_registry, tracking

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    path = root / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "name": "itest-sweep",
        "base_config": str(REPO / "configs" / "quickstart.yaml"),
        "overrides": ["data.max_train_rows=64", "sft.max_steps=6", "sft.batch_size=8", "sft.warmup_steps=0",
                      "sft.log_every=1", "sft.checkpoint_every=2", "eval.max_rows=8", "eval.max_new_tokens=8",
                      f"output_dir={root / 'out'}", f"tracking.uri={uri}",
                      f"tracking.artifact_location={root / 'art'}"],
        "search_space": {
            "adapter.method": {"grid": ["lora", "prompt"]},
            "adapter.num_virtual_tokens": {"grid": [16]},
            "sft.learning_rate": [{"grid": [1.0e-2, 1.0e30], "when": {"adapter.method": ["lora"]}},
                                  {"grid": [1.0e-8], "when": {"adapter.method": ["prompt"]}}],
        },
        "scheduler": {"type": "asha", "metric": "train_loss", "mode": "min", "grace_period": 2,
                      "reduction_factor": 2},
        "metric": "rougeL_after",
        "mode": "max",
        "max_concurrent_trials": 2,
        "resources": {"num_workers": 1, "cpus_per_worker": 1},
    }))
    from raypeft.tune.schema import load_sweep
    from raypeft.tune.sweep import prepare, run_sweep

    lines: list[str] = []
    loaded, base_items = load_sweep(path)
    outcome = run_sweep(prepare(loaded, path, base_items), log=lines.append)
    yield {"outcome": outcome, "uri": uri, "log": "\n".join(lines), "root": root, "free_cpus": _free_cpus_after()}
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _free_cpus_after(wait_s: float = 60.0) -> tuple[float, float]:
    """``(free, total)`` CPUs once every trial's Ray Train workers are gone (or after ``wait_s``)."""
    import time

    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    deadline = time.time() + wait_s
    while time.time() < deadline and ray.available_resources().get("CPU", 0.0) < total:
        time.sleep(1.0)
    return ray.available_resources().get("CPU", 0.0), total


def _trial_kinds(outcome) -> dict[str, object]:
    rows = {(r.method, r.lr): r for r in outcome.rows}
    return {"good": rows[("lora", 1e-2)], "nan": rows[("lora", 1e30)], "slow": rows[("prompt", 1e-8)]}


@pytest.mark.slow
def test_trials_end_as_completed_failed_and_early_stopped(sweep) -> None:
    outcome = sweep["outcome"]
    kinds = _trial_kinds(outcome)
    assert kinds["good"].status == "completed" and kinds["good"].usable()
    assert kinds["nan"].status == "failed" and kinds["nan"].error
    assert kinds["slow"].status == "early-stopped"
    assert outcome.best is kinds["good"]
    assert outcome.rows[0] is kinds["good"]  # ranked: usable trials first
    assert "failed (the sweep goes on)" in sweep["log"]
    # The failed and the stopped trial gave their workers' CPUs back (no leaked placement group).
    free, total = sweep["free_cpus"]
    assert free == total
    assert "stopped early by the scheduler at step 2" in sweep["log"]


@pytest.mark.slow
def test_parent_and_child_runs_in_mlflow(sweep) -> None:
    outcome, client = sweep["outcome"], MlflowClient(sweep["uri"])
    parent = client.get_run(outcome.parent_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["raypeft.sweep"] == "itest-sweep"
    assert parent.data.metrics["trials_completed"] == 1 and parent.data.metrics["trials_failed"] == 1
    assert parent.data.metrics["trials_stopped"] == 1
    assert parent.data.tags["raypeft.best_run_id"] == outcome.best.run_id
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{outcome.parent_run_id}'")
    assert len(children) == 3
    by_id = {c.info.run_id: c for c in children}
    kinds = _trial_kinds(outcome)
    assert by_id[kinds["good"].run_id].info.status == "FINISHED"
    failed = by_id[kinds["nan"].run_id]
    assert failed.info.status == "FAILED" and failed.data.tags["raypeft.trial_status"] == "failed"
    assert failed.data.tags["raypeft.error"]
    stopped = by_id[kinds["slow"].run_id]
    assert stopped.info.status == "KILLED" and stopped.data.tags["raypeft.stopped_by"] == "asha"

    good = by_id[kinds["good"].run_id]
    assert good.data.params["sft.learning_rate"] == "0.01" and good.data.params["adapter.method"] == "lora"
    for key in ("rougeL_after", "peak_rss_mib", "trainable_params", "adapter_size_bytes", "tokens_per_s"):
        assert key in good.data.metrics, key
    assert [m.step for m in client.get_metric_history(good.info.run_id, "train_loss")] == [1, 2, 3, 4, 5, 6]
    assert kinds["good"].metric == good.data.metrics["rougeL_after"]
    # ASHA compared the step-2 losses (the stopped trial's run may have logged a few more steps
    # before Tune ended its actor: the steps are fast and the decision asynchronous).
    slow_loss = client.get_metric_history(stopped.info.run_id, "train_loss")[1].value
    good_loss = client.get_metric_history(good.info.run_id, "train_loss")[1].value
    assert slow_loss > good_loss


@pytest.mark.slow
def test_summary_artifacts_on_the_parent(sweep) -> None:
    outcome, client = sweep["outcome"], MlflowClient(sweep["uri"])
    names = {a.path for a in client.list_artifacts(outcome.parent_run_id)}
    assert {"summary.md", "summary.csv", "summary.png", "sweep.yaml", "base_config.yaml"} <= names
    png = Path(client.download_artifacts(outcome.parent_run_id, "summary.png", str(sweep["root"])))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (outcome.out_dir / "summary.md").read_text().splitlines()
    assert table[0].split(" | ")[:8] == ["| trial", "status", "method", "r", "alpha", "tokens", "lr", "rougeL_after"]
    assert len(table) == 2 + 3
    assert "| completed | lora |" in table[2]
    assert any("| failed | lora |" in line and "| 1e+30 |" in line for line in table)
    assert any("| early-stopped | prompt |" in line and "| 16 |" in line for line in table)
    assert outcome.table in sweep["log"]


@pytest.mark.slow
def test_best_adapter_registered_with_alias_and_sweep_tags(sweep) -> None:
    outcome, uri = sweep["outcome"], sweep["uri"]
    assert outcome.registered_name == "quickstart-sft"
    version = MlflowClient(uri).get_model_version_by_alias("quickstart-sft", "best")
    assert int(version.version) == outcome.registered_version
    assert version.run_id == outcome.best.run_id
    assert version.tags["sweep"] == "itest-sweep" and version.tags["method"] == "lora"
    assert version.tags["sweep_run_id"] == outcome.parent_run_id
    assert math.isclose(float(version.tags["rougeL_after"]), outcome.best.metric)
    rows = model_registry.list_versions(uri, "quickstart-sft")
    assert rows[0].aliases == ["best"] and rows[0].metrics["rougeL_after"] == outcome.best.metric
    # models:/NAME@best is the best trial's published adapter, byte for byte.
    folder = tracking.resolve_adapter("models:/quickstart-sft@best", tracking_uri=uri)
    trial_adapter = outcome.out_dir / "trials" / outcome.best.trial_id / "quickstart" / "sft" / "adapter"
    assert (folder / "adapter_model.safetensors").read_bytes() == \
        (trial_adapter / "adapter_model.safetensors").read_bytes()


@pytest.mark.slow
def test_eval_of_the_best_adapter_reproduces_its_rouge(sweep, capsys: pytest.CaptureFixture) -> None:
    outcome, uri = sweep["outcome"], sweep["uri"]
    code = cli.main(["eval", str(REPO / "configs" / "quickstart.yaml"), "--adapter", "models:/quickstart-sft@best",
                     "--set", f"tracking.uri={uri}", "--set", "eval.max_rows=8", "--set", "eval.max_new_tokens=8"])
    assert code == 0
    out = capsys.readouterr().out
    assert f"'rougeL': {round(outcome.best.metric, 4)}" in out
