"""Real faults: a Ray Train worker killed mid-stage restarts from the last checkpoint and finishes.

The test kills one ``RayTrainWorker`` process with SIGKILL once the stage has written its first
checkpoint. With ``failure.max_failures`` the stage must finish with the same step count as an
uninterrupted run, in the same MLflow run (continued, not duplicated), with every loss step
logged exactly once.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
from mlflow import MlflowClient

from raypeft.pipeline.config import load_config

REPO = Path(__file__).resolve().parents[2]
STEPS = 30


def _train_workers() -> list[psutil.Process]:
    """This test's Ray Train workers: descendants of this process, which started the local Ray.
    Matching the name alone would also kill another run's worker on the same machine."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        try:
            if cmdline.startswith("ray::RayTrainWorker") and any(p.pid == os.getpid() for p in proc.parents()):
                found.append(proc)
        except psutil.NoSuchProcess:
            continue
    return found


def _checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("ray/sft-*/checkpoint_*") if p.is_dir()) if root.exists() else []


@pytest.mark.slow
def test_killed_worker_resumes_from_checkpoint_without_losing_or_doubling_steps(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from raypeft.pipeline.workflow import run_workflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [
        "stages=[sft]", "data.max_train_rows=480", f"sft.max_steps={STEPS}", "sft.batch_size=8", "sft.log_every=1",
        "sft.checkpoint_every=5", "eval.rouge=false", "scaling.num_workers=2", "failure.max_failures=2",
        f"tracking.uri={uri}", f"output_dir={tmp_path / 'out'}", "name=faults",
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
    deadline = time.time() + 240
    while time.time() < deadline and thread.is_alive():
        if _checkpoints(cfg.output_path()):
            workers = _train_workers()
            if workers:
                killed = workers[-1]
                os.kill(killed.pid, signal.SIGKILL)
                break
        time.sleep(0.05)
    thread.join(timeout=400)
    assert killed is not None, "the stage finished (or never checkpointed) before a worker could be killed"
    assert "error" not in outcome, outcome.get("error")
    (stage,) = outcome["result"]
    import ray

    ray.shutdown()

    client = MlflowClient(uri)
    run = client.get_run(stage.run_id)
    assert run.info.status == "FINISHED"
    assert stage.metrics["step"] == STEPS
    steps = [m.step for m in client.get_metric_history(stage.run_id, "train_loss")]
    assert sorted(steps) == list(range(1, STEPS + 1)), steps  # none lost, none doubled
    parent = run.data.tags["mlflow.parentRunId"]
    children = client.search_runs([run.info.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert len(children) == 1  # the restart continued the stage's run
    # Every checkpoint Ray kept is complete (the marker is written last).
    for ckpt in _checkpoints(cfg.output_path()):
        assert (ckpt / "checkpoint.json").is_file(), ckpt
