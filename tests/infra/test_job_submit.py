"""``ray job submit`` of a raypeft workflow against a real two-node cluster on this machine.

``infra/local-cluster.sh`` starts a head and one worker node (1 CPU each, token auth, dashboard
on loopback, free ports); the test submits ``raypeft run configs/quickstart.yaml`` (SFT only,
a few steps) with ``--working-dir`` the repository and a runtime env running this venv's Python,
waits for SUCCEEDED, and reads the MLflow SQLite store the job wrote (a file every node on this
machine sees): the workflow's parent run and the stage's child run FINISHED, step metrics from
both training workers, and the adapter registered with its files in the artifact store. The
cluster is always stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path
from typing import Iterator

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "infra" / "local-cluster.sh"
BIN = Path(sys.executable).parent
RAY = BIN / "ray"
STEPS = 4

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("setsid") is None, reason="local-cluster.sh needs setsid"),
    pytest.mark.skipif(not (BIN / "raypeft").exists(), reason="raypeft is not installed next to this Python"),
    pytest.mark.skipif(not RAY.exists(), reason="the ray CLI is not installed next to this Python"),
]

# Waits for a job to reach a terminal state and prints {"status": ..., "logs": ...} (in a
# subprocess, so the test process never connects to the cluster itself).
WAIT = textwrap.dedent(
    """
    import json, sys, time
    from ray.job_submission import JobStatus, JobSubmissionClient
    client = JobSubmissionClient(sys.argv[1])
    deadline = time.monotonic() + float(sys.argv[3])
    status = client.get_job_status(sys.argv[2])
    while not status.is_terminal() and time.monotonic() < deadline:
        time.sleep(2)
        status = client.get_job_status(sys.argv[2])
    if not status.is_terminal():
        client.stop_job(sys.argv[2])
    print(json.dumps({"status": str(status), "logs": client.get_job_logs(sys.argv[2])[-6000:]}))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@pytest.fixture()
def cluster() -> Iterator[dict]:
    # Ray's unix socket paths live under the temp dir and must stay short: not pytest's tmp_path.
    state = tempfile.mkdtemp(prefix="rpj-", dir="/tmp")
    env = dict(os.environ, RAYPEFT_CLUSTER_DIR=state, RAY=str(RAY), RAY_AUTH_MODE="token",
               RAYPEFT_CLUSTER_TIMEOUT="120")
    for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    info = {"state": state, "env": env, "port": _free_port(), "dashboard_port": _free_port()}
    try:
        started = subprocess.run(["bash", str(SCRIPT), "start", "--workers", "1", "--head-cpus", "1",
                                  "--worker-cpus", "1", "--port", str(info["port"]),
                                  "--dashboard-port", str(info["dashboard_port"])],
                                 env=env, capture_output=True, text=True, timeout=300)
        assert started.returncode == 0, started.stdout[-2000:] + started.stderr[-3000:]
        yield info
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=180)
        shutil.rmtree(state, ignore_errors=True)


def test_ray_job_submit_runs_the_quickstart_and_tracks_it_in_mlflow(cluster: dict, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    env = cluster["env"]
    url = f"http://127.0.0.1:{cluster['dashboard_port']}"
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    artifacts = (tmp_path / "artifacts").as_uri()
    runtime_env = {
        "py_executable": sys.executable,  # this venv's Python for the job's workers and actors
        "env_vars": {"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"},
        "excludes": [".venv", ".devbundle", ".git", "outputs", "mlartifacts", "mlflow.db", ".pytest_cache"],
    }
    overrides = ["stages=[sft]", "name=jobsubmit", f"output_dir={tmp_path / 'out'}",
                 "data.max_train_rows=64", f"sft.max_steps={STEPS}", "sft.batch_size=8", "sft.log_every=1",
                 "sft.checkpoint_every=2", "sft.warmup_steps=0", "eval.max_rows=8", "eval.max_new_tokens=8",
                 f"tracking.uri={store}", f"tracking.artifact_location={artifacts}"]
    entrypoint = ["raypeft", "run", "configs/quickstart.yaml"] + [a for o in overrides for a in ("--set", o)]
    submitted = subprocess.run(
        [str(RAY), "job", "submit", "--address", url, "--submission-id", "raypeft-quickstart", "--no-wait",
         "--working-dir", str(REPO), "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint],
        env=env, capture_output=True, text=True, timeout=180)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]

    waited = subprocess.run([sys.executable, "-c", WAIT, url, "raypeft-quickstart", "420"], env=env,
                            capture_output=True, text=True, timeout=480)
    assert waited.returncode == 0, waited.stderr[-3000:]
    job = json.loads(waited.stdout.strip().splitlines()[-1])
    assert job["status"] == "SUCCEEDED", job["logs"]
    assert "[raypeft] stage sft: adapter at" in job["logs"], job["logs"]

    client = MlflowClient(store)
    experiment = client.get_experiment_by_name("raypeft")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}, [(r.info.run_name, r.info.status)
                                                                            for r in runs]
    child = next(r for r in runs if "mlflow.parentRunId" in r.data.tags)
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "train_loss")]
    assert sorted(steps) == list(range(1, STEPS + 1)), steps
    metrics = child.data.metrics
    assert {"rouge1_before", "rouge1_after", "tokens_per_s", "adapter_size_bytes"} <= set(metrics), sorted(metrics)
    assert {"peak_rss_mib/rank0", "peak_rss_mib/rank1"} <= set(metrics)  # both training workers reported

    (version,) = client.search_model_versions("name = 'jobsubmit-sft'")
    assert version.run_id == child.info.run_id and version.tags["method"] == "lora"
    local = Path(client.download_artifacts(child.info.run_id, "adapter", str(tmp_path / "dl")))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in local.iterdir()}
    assert str(tmp_path / "artifacts") in experiment.artifact_location or \
        experiment.artifact_location == artifacts
