"""infra/mlflow-server.sh for real: a SQLite-backed server on loopback that stores a run's
artifacts under its own artifact root (mlflow-artifacts:/), and refuses unknown Host headers."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

import psutil
import pytest
from mlflow import MlflowClient

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "infra" / "mlflow-server.sh"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("setsid") is None, reason="needs setsid to stop the server's process tree"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _status(url: str, host: str) -> int:
    req = urllib.request.Request(url, headers={"Host": host})
    try:
        return urllib.request.urlopen(req, timeout=5).status
    except urllib.error.HTTPError as exc:
        return exc.code


def _stop_session(proc: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM the server's session, then SIGKILL stragglers, all by pid."""
    sid = proc.pid

    def members() -> list[int]:
        proc.poll()  # reap our own child so it does not linger as a zombie
        out = []
        for p in psutil.process_iter(["status"]):
            try:
                if p.info["status"] != psutil.STATUS_ZOMBIE and os.getsid(p.pid) == sid:
                    out.append(p.pid)
            except (ProcessLookupError, PermissionError):
                pass
        return out

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in members():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while members() and time.monotonic() < deadline:
            time.sleep(0.5)
        if not members():
            return
    raise AssertionError(f"mlflow server processes left: {members()}")


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[dict]:
    port = _free_port()
    env = dict(os.environ, RAYPEFT_MLFLOW_DIR=str(tmp_path / "store"), MLFLOW_PORT=str(port),
               MLFLOW_WORKERS="1", MLFLOW_ALLOWED_HOSTS="mlflow:*")
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(["bash", str(SCRIPT)], env=env, cwd=tmp_path, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                if urllib.request.urlopen(url + "/health", timeout=2).status == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server did not answer /health in 90 s"
            time.sleep(0.5)
        yield {"url": url, "port": port, "store": tmp_path / "store", "pid": proc.pid}
    finally:
        _stop_session(proc)
        log.close()


def test_server_stores_runs_and_artifacts_and_checks_host_headers(server: dict, tmp_path: Path) -> None:
    url, store = server["url"], server["store"]
    # Only loopback listens.
    listening = [c for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == server["port"]]
    assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening), listening

    client = MlflowClient(url)
    exp = client.create_experiment("infra-test", artifact_location="mlflow-artifacts:/raypeft")
    run = client.create_run(exp)
    client.log_metric(run.info.run_id, "loss", 0.5, step=3)
    adapter = tmp_path / "adapter_config.json"
    adapter.write_text('{"peft_type": "LORA"}')
    client.log_artifact(run.info.run_id, str(adapter), "adapter")
    client.set_terminated(run.info.run_id)

    # The run is in the SQLite file, the artifact under the server's artifact root.
    assert (store / "mlflow.db").is_file()
    stored = list((store / "artifacts").rglob("adapter_config.json"))
    assert len(stored) == 1 and stored[0].read_text() == '{"peft_type": "LORA"}'
    assert client.get_metric_history(run.info.run_id, "loss")[0].step == 3

    api = url + "/api/2.0/mlflow/experiments/search?max_results=1"
    assert _status(api, f"127.0.0.1:{server['port']}") == 200
    assert _status(api, f"mlflow:{server['port']}") == 200  # MLFLOW_ALLOWED_HOSTS
    assert _status(api, "attacker.example") == 403
