"""Driver-side checks that ``pipeline.preflight`` runs before anything is started.

Each turns a problem that would otherwise surface minutes later inside every Ray worker (or
hang on a retry loop) into one line on the driver, before a run, a folder or a Ray cluster
exists:

* rows longer than ``data.max_length``: refused (``data.truncation: error``, by the tokenizer
  functions of ``pipeline.data``) or counted and reported here as a warning (``left-prompt``);
  each stage's ``check_data`` tokenizes its own rows;
* the MLflow tracking store: probed with retries off, so an unreachable URI fails in seconds
  instead of MLflow's default minutes of back-off;
* a base model or tokenizer that will not load: one line, pointing at ``trust_remote_code``
  when the folder ships code.

Input adapters are checked where they are resolved: ``pipeline.adapter_inputs``.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import datasets
from mlflow import MlflowClient

from raypeft.pipeline.tracking import TrackingError

Warn = Callable[[str], None]

# Retries and timeout of the one probe request: enough for a server that is up, short for one
# that is not. MLflow reads these variables on every request.
_PROBE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def warn_stderr(message: str) -> None:
    print(f"raypeft: warning: {message}", file=sys.stderr)


# ------------------------------------------------------------------------------ row lengths

def report_truncation(field: str, truncated: int, rows: int, max_length: int, warn: Warn,
                      cut: str = "their prompts are cut from the left") -> None:
    """Warn that ``truncated`` of the ``rows`` of ``field`` (e.g. ``data.source``) were cut (``cut``: how)."""
    if truncated:
        warn(f"data.max_length: {truncated} of {rows} rows of {field} are longer than {max_length} tokens; "
             f"{cut} (data.truncation: left-prompt; 'error' refuses them)")


# ------------------------------------------------------------------------------ tracking

@contextmanager
def _fast_http() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in _PROBE_ENV}
    os.environ.update(_PROBE_ENV)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_REASONS = (("Connection refused", "connection refused"), ("timed out", "timed out"),
            ("Name or service not known", "unknown host"), ("nodename nor servname", "unknown host"),
            ("Temporary failure in name resolution", "unknown host"), ("SSL", "TLS error"))


def _why(exc: BaseException) -> str:
    """A short reason for a failed request; MLflow's own message is a paragraph of urllib3 text."""
    text = str(exc)
    for needle, reason in _REASONS:
        if needle in text:
            return reason
    first = text.strip().splitlines()[0] if text.strip() else type(exc).__name__
    return first[:200]


def probe_tracking(uri: str) -> None:
    """Fail in seconds, with one line, if the tracking store cannot be used.

    HTTP(S): one request with retries off. SQLite: the database's folder must exist (MLflow
    creates the file, not its folders). Other schemes are left to MLflow.
    """
    if uri.startswith(("http://", "https://")):
        with _fast_http():
            try:
                MlflowClient(uri).search_experiments(max_results=1)
            except Exception as exc:  # connection errors surface as many exception types
                raise TrackingError(f"tracking.uri: cannot reach MLflow at {uri} ({_why(exc)}); start the "
                                    "server, or fix tracking.uri / MLFLOW_TRACKING_URI") from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if str(db) not in ("", ":memory:") and not db.parent.is_dir():
            raise TrackingError(f"tracking.uri: folder {db.parent} of the SQLite store {uri} does not exist")


# ------------------------------------------------------------------------------ messages

@contextmanager
def quiet_progress() -> Iterator[None]:
    """No dataset progress bars while checking: a bad input must read as one line on stderr."""
    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def model_load_error(spec: Any, exc: BaseException) -> str:
    """One line for a base model or tokenizer that will not load; points at trust_remote_code when
    the folder asks for code of its own."""
    name = spec.name_or_path
    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().exists():
        return f"model.name_or_path: folder {name} not found (give a local model folder, a hub id, or 'demo')"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    message = f"model.name_or_path: cannot load '{name}': {first[:300]}"
    if not spec.trust_remote_code and ("trust_remote_code" in str(exc) or _asks_for_code(spec.name_or_path)):
        message += (" (it ships its own Python code, which raypeft does not run unless the YAML sets "
                    "model.trust_remote_code: true; do that only for a source you trust)")
    return message


def _asks_for_code(name_or_path: str) -> bool:
    config = Path(name_or_path).expanduser() / "config.json"
    try:
        return "auto_map" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False
