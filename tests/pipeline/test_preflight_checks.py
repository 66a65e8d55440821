"""Driver-side checks of ``pipeline.preflight_checks``: the tracking probe and the artifact-location rule."""

from __future__ import annotations

import http.server
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from raypeft.pipeline.preflight_checks import probe_tracking
from raypeft.pipeline.config import parse_config
from raypeft.pipeline.tracking import TrackingError


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_in_seconds_without_touching_retry_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    started = time.monotonic()
    with pytest.raises(TrackingError, match=r"^tracking\.uri: cannot reach MLflow at http://127\.0\.0\.1:\d+ "
                                            r"\(connection refused\); start the server"):
        probe_tracking(f"http://127.0.0.1:{_free_port()}")
    assert time.monotonic() - started < 10
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "7"  # training keeps MLflow's retries


def test_a_server_that_is_not_mlflow_is_reported() -> None:
    class NotMlflow(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            self.send_response(404)
            self.end_headers()
            self.wfile.write(b"nothing here")

        do_POST = do_GET  # noqa: N815

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotMlflow)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        with pytest.raises(TrackingError, match=r"^tracking\.uri: cannot reach MLflow at http://127\.0\.0\.1:\d+ "
                                                r"\(.*404"):
            probe_tracking(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()


def test_sqlite_store_needs_its_folder(tmp_path: Path) -> None:
    probe_tracking(f"sqlite:///{tmp_path / 'm.db'}")
    assert not (tmp_path / "m.db").exists()  # the probe creates nothing
    with pytest.raises(TrackingError, match=r"folder .*/missing of the SQLite store .* does not exist"):
        probe_tracking(f"sqlite:///{tmp_path / 'missing' / 'm.db'}")


def test_artifacts_go_to_the_server_for_http_tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert parse_config({}).artifact_location() == (tmp_path / "mlartifacts").as_uri()
    assert parse_config({"tracking": {"uri": "http://127.0.0.1:5000"}}).artifact_location() is None
    assert parse_config({"tracking": {"uri": "https://mlflow.example"}}).artifact_location() is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert parse_config({}).artifact_location() is None
    explicit = {"tracking": {"uri": "http://127.0.0.1:5000", "artifact_location": "mlflow-artifacts:/raypeft"}}
    assert parse_config(explicit).artifact_location() == "mlflow-artifacts:/raypeft"
