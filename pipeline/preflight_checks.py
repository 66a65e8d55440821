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
import re
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import unquote, urlparse

import datasets
from mlflow import MlflowClient

from raypeft.pipeline.config import ConfigError
from raypeft.pipeline.tracking import TrackingError
from raypeft.pipeline.writable import file_problem, folder_problem

Warn = Callable[[str], None]

# Retries and timeout of the one probe request: enough for a server that is up, short for one
# that is not. MLflow reads these variables on every request.
_PROBE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}


def warn_stderr(message: str) -> None:
    print(f"raypeft: warning: {message}", file=sys.stderr)


# ------------------------------------------------------------------------------ row lengths

def report_truncation(field: str, truncated: int, rows: int, max_length: int, warn: Warn,
                      responses_cut: int = 0, cut: str = "their prompts are cut from the left") -> None:
    """Warn that ``truncated`` of the ``rows`` of ``field`` (e.g. ``data.source``) were cut
    (``cut``: how), and, for the ``responses_cut`` whose response alone leaves no room, that the
    response is cut at its end too (the warning says which, so a cut response is not a surprise)."""
    if not truncated:
        return
    what = cut
    if responses_cut:
        what += (f", and in {responses_cut} of them the response itself is longer than the room left and is "
                 "cut at its end")
    warn(f"data.max_length: {truncated} of {rows} rows of {field} are longer than {max_length} tokens; "
         f"{what} (data.truncation: left-prompt; 'error' refuses them)")


# ------------------------------------------------------------------------------ adapter size

# fp32 weight, its gradient and Adam's two moments: what each trainable parameter costs a worker.
BYTES_PER_TRAINABLE = 16


def physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_adapter_size(adapter: Any, trainable: int | None, memory: int | None = None) -> None:
    """Refuse an adapter whose trainable parameters (counted on the weightless skeleton) cannot
    fit in this machine's memory with their gradients and optimiser state: a too-large
    ``adapter.r`` would otherwise fail in every worker with an allocation error."""
    memory = physical_memory_bytes() if memory is None else memory
    if trainable is None or memory is None:
        return
    need = trainable * BYTES_PER_TRAINABLE
    if need > memory:
        field = "adapter.r" if hasattr(adapter, "r") else "adapter"
        value = f"{getattr(adapter, 'r')} gives" if hasattr(adapter, "r") else f"method {adapter.method} has"
        raise ConfigError(f"{field}: {value} {trainable:.3g} trainable parameters, {need / 1e9:,.1f} GB with "
                          f"their gradients and Adam state, more than this machine's {memory / 1e9:,.1f} GB of "
                          "memory; lower it")


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


# Schemes MLflow has a tracking store for; the databases may name a driver (postgresql+psycopg2).
TRACKING_SCHEMES = ("sqlite", "http", "https", "file", "postgresql", "mysql", "mssql", "databricks", "databricks-uc")
_URI_EXAMPLES = "sqlite:////abs/path/mlflow.db, http://host:5000, file:///abs/dir or postgresql://..."


def _scheme(uri: str) -> str | None:
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", uri)
    if uri in ("databricks", "databricks-uc"):
        return uri
    if match is None or not uri[match.end():].startswith("//") and match.group(1) != "databricks":
        return None
    return match.group(1).lower()


def _local_path(uri: str, scheme: str) -> Path | None:
    """The file (sqlite) or folder (file) a local store lives at; None for an in-memory store."""
    if scheme == "sqlite":
        if not uri.startswith("sqlite:///"):
            return None
        rest = uri[len("sqlite:///"):].split("?", 1)[0]
        return None if rest in ("", ":memory:") else Path(rest)
    return Path(unquote(urlparse(uri).path))


def probe_tracking(uri: str, *, write: bool = True, field: str = "tracking.uri") -> None:
    """Fail in seconds, with one line, if the tracking store cannot be used.

    The URI must have a scheme MLflow has a store for. HTTP(S): one request with retries off.
    SQLite / ``file:``: with ``write`` (``run``, ``sweep``) the database's folder must exist and
    take new files (MLflow creates the file, not its folders; in a read-only folder it retries for
    minutes); without (``eval``, ``registry``: they only read) the store must already exist, so a
    read-only command never creates one. Other databases are left to MLflow.
    """
    scheme = _scheme(uri)
    if scheme is None:
        raise TrackingError(f"{field}: {uri!r} is not a URI; expected {_URI_EXAMPLES}")
    if scheme.split("+", 1)[0] not in TRACKING_SCHEMES:
        raise TrackingError(f"{field}: unsupported scheme '{scheme}' in {uri}; expected one of "
                            f"{', '.join(TRACKING_SCHEMES)}")
    if scheme in ("http", "https"):
        with _fast_http():
            try:
                MlflowClient(uri).search_experiments(max_results=1)
            except Exception as exc:  # connection errors surface as many exception types
                raise TrackingError(f"{field}: cannot reach MLflow at {uri} ({_why(exc)}); start the "
                                    "server, or fix tracking.uri / MLFLOW_TRACKING_URI") from None
        return
    if scheme not in ("sqlite", "file"):
        return
    path = _local_path(uri, scheme)
    if path is None:
        return
    if not write:
        if not path.exists():
            raise TrackingError(f"{field}: no MLflow store at {path} ({uri}); this command only reads a store, "
                                "it does not create one")
        return
    folder = path.parent if scheme == "sqlite" else path
    if scheme == "sqlite" and not folder.is_dir():
        raise TrackingError(f"{field}: folder {folder} of the SQLite store {uri} does not exist")
    problem = file_problem(path) if scheme == "sqlite" else folder_problem(path)
    if problem:
        raise TrackingError(f"{field}: the store {uri} is not writable: {problem}")


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
