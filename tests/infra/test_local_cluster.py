"""infra/local-cluster.sh for real: a head and a worker node on this machine, a job through the
Jobs API that runs a task on the worker node, then a stop that leaves no Ray process behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Iterator

import psutil
import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "infra" / "local-cluster.sh"
RAY = Path(sys.executable).with_name("ray")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("setsid") is None, reason="local-cluster.sh needs setsid"),
    pytest.mark.skipif(not RAY.exists(), reason="the ray CLI is not installed next to this Python"),
]

JOB = textwrap.dedent(
    """
    import json
    import ray

    ray.init()

    @ray.remote(num_cpus=1, resources={"worker_node": 0.01})
    def on_worker_node():
        return ray.get_runtime_context().get_node_id()

    print("RESULT " + json.dumps({
        "alive_nodes": sum(1 for n in ray.nodes() if n["Alive"]),
        "driver_node": ray.get_runtime_context().get_node_id(),
        "task_node": ray.get(on_worker_node.remote()),
    }))
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _processes_mentioning(path: str) -> list[psutil.Process]:
    """Every live process whose command line names ``path`` (all our nodes' processes do)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(path in arg for arg in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


@pytest.fixture()
def cluster() -> Iterator[dict]:
    # Ray's unix socket paths live under the temp dir and must stay short: not pytest's tmp_path.
    state = tempfile.mkdtemp(prefix="rpc-", dir="/tmp")
    env = dict(os.environ, RAYPEFT_CLUSTER_DIR=state, RAY=str(RAY), RAY_AUTH_MODE="token")
    env.pop("RAY_ADDRESS", None)
    info = {"state": state, "env": env, "port": _free_port(), "dashboard_port": _free_port()}
    try:
        yield info
    finally:
        # Whatever the test did, leave nothing running (stop is a no-op once stopped).
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def _run(args: list[str], env: dict, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)


def test_head_and_worker_run_a_submitted_job_and_stop_cleanly(cluster: dict, tmp_path: Path) -> None:
    env, state = cluster["env"], cluster["state"]
    started = _run(["bash", str(SCRIPT), "start", "--workers", "1", "--port", str(cluster["port"]),
                    "--dashboard-port", str(cluster["dashboard_port"])], env)
    assert started.returncode == 0, started.stderr[-3000:]
    assert f"dashboard http://127.0.0.1:{cluster['dashboard_port']}" in started.stdout
    assert "MLFLOW_TRACKING_URI" in started.stdout

    session_ids = [int(Path(state, f"{n}.pid").read_text()) for n in ("head", "worker-1")]
    assert all(psutil.pid_exists(pid) for pid in session_ids)

    # `status` runs `ray status`: two active nodes and the worker's custom resource. Its autoscaler
    # view trails node registration by a few seconds, so poll it briefly.
    deadline = time.monotonic() + 30
    while True:
        status = _run(["bash", str(SCRIPT), "status"], env)
        assert status.returncode == 0, status.stderr[-3000:]
        active = status.stdout.split("Active:")[1].split("Pending:")[0]
        if len(re.findall(r"node_[0-9a-f]+", active)) == 2 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert len(re.findall(r"node_[0-9a-f]+", active)) == 2, status.stdout
    assert "0.0/1.0 worker_node" in status.stdout

    # The dashboard listens on loopback only.
    dash = [c for c in psutil.net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == cluster["dashboard_port"]]
    assert dash and all(c.laddr.ip == "127.0.0.1" for c in dash), dash

    workdir = tmp_path / "job"
    workdir.mkdir()
    (workdir / "job.py").write_text(JOB)
    url = f"http://127.0.0.1:{cluster['dashboard_port']}"
    submitted = _run([str(RAY), "job", "submit", "--address", url, "--submission-id", "infra-smoke",
                      "--working-dir", str(workdir), "--", "python", "job.py"], env)
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    result = json.loads(submitted.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert result["alive_nodes"] == 2
    assert result["task_node"] != result["driver_node"], "the worker_node task ran on the head node"

    job_status = _run([sys.executable, "-c", "import sys; from ray.job_submission import "
                       "JobSubmissionClient as C; print(C(sys.argv[1]).get_job_status(sys.argv[2]))",
                       url, "infra-smoke"], env)
    assert job_status.stdout.strip() == "SUCCEEDED", job_status.stdout + job_status.stderr[-2000:]

    stopped = _run(["bash", str(SCRIPT), "stop"], env)
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    leftovers = [p for p in psutil.process_iter(["pid"])
                 if _session_of(p) in session_ids] + _processes_mentioning(state)
    assert not leftovers, [(p.pid, p.cmdline()) for p in leftovers if p.is_running()]
    assert _run(["bash", str(SCRIPT), "status"], env).returncode == 3


def _session_of(proc: psutil.Process) -> int | None:
    try:
        return os.getsid(proc.pid)
    except (ProcessLookupError, PermissionError):
        return None

