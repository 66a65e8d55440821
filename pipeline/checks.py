"""Driver-side checks that ``pipeline.workflow.preflight`` runs before anything is started.

Each turns a problem that would otherwise surface minutes later inside every Ray worker (or
hang on a retry loop) into one line on the driver, before a run, a folder or a Ray cluster
exists:

* rows longer than ``data.max_length``: refused (``data.truncation: error``) or counted and
  reported as a warning (``left-prompt``);
* the MLflow tracking store: probed with retries off, so an unreachable URI fails in seconds
  instead of MLflow's default minutes of back-off;
* input adapters (``adapter.init_from``, ``reward.init_from``, ``ppo.policy_init``, ...):
  weights only from safetensors (a pickled ``adapter_model.bin`` needs
  ``model.allow_pickle_adapters: true`` and is then read with ``torch.load(weights_only=True)``
  and converted, so workers only ever read safetensors), and every tensor's shape checked
  against this base model on a weightless skeleton, naming the layer that does not fit.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from raypeft.pipeline.config import STAGES, ConfigError, RunConfig
from raypeft.pipeline.data import tokenize_pairs, tokenize_sft
from raypeft.pipeline.tracking import TrackingError

Warn = Callable[[str], None]

# Retries and timeout of the one probe request: enough for a server that is up, short for one
# that is not. MLflow reads these variables on every request.
_PROBE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
              "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
SAFE_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"


def warn_stderr(message: str) -> None:
    print(f"raypeft: warning: {message}", file=sys.stderr)


# ------------------------------------------------------------------------------ row lengths

def _report_truncation(field: str, truncated: int, rows: int, max_length: int, warn: Warn) -> None:
    if truncated:
        warn(f"data.max_length: {truncated} of {rows} rows of {field} are longer than {max_length} tokens; "
             "their prompts are cut from the left (data.truncation: left-prompt; 'error' refuses them)")


def check_sft_lengths(cfg: RunConfig, rows: Any, tokenizer: Any, warn: Warn = warn_stderr) -> int:
    """Tokenize the SFT train rows as the workers will; raise (``error``) or warn about long rows.

    Returns how many rows were truncated.
    """
    data = cfg.data
    _, report = tokenize_sft(rows, tokenizer, prompt_column=data.columns.prompt,
                             response_column=data.columns.response, prompt_template=data.prompt_template,
                             max_length=data.max_length, is_seq2seq=cfg.model.task_type == "SEQ_2_SEQ_LM",
                             truncation=data.truncation)
    _report_truncation("data.source", report.truncated, report.rows, data.max_length, warn)
    return report.truncated


def check_pair_lengths(cfg: RunConfig, rows: Any, tokenizer: Any, field: str, warn: Warn = warn_stderr) -> int:
    """The same for preference pairs (``field``: ``reward.data`` or ``dpo.data``)."""
    columns = (cfg.reward if field.startswith("reward") else cfg.dpo).data.columns
    _, report = tokenize_pairs(rows, tokenizer, prompt_column=columns.prompt, chosen_column=columns.chosen,
                               rejected_column=columns.rejected, prompt_template=cfg.data.prompt_template,
                               max_length=cfg.data.max_length, truncation=cfg.data.truncation)
    _report_truncation(f"{field}.source", report.truncated, report.rows, cfg.data.max_length, warn)
    return report.truncated


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
        from mlflow import MlflowClient

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


# ------------------------------------------------------------------------------ input adapters

def _from_this_run(value: str | None, order: list[str]) -> bool:
    """A stage-name input that this invocation produces: it does not exist yet (or is replaced)."""
    return value in STAGES and value in order


def safe_adapter_folder(folder: str, field: str, *, allow_pickle: bool) -> str:
    """``folder`` if its weights are safetensors; a converted copy of a pickled one if allowed.

    The pickle is read once, here, with ``torch.load(weights_only=True)`` (which refuses
    anything but tensors and plain containers); the copy holds ``adapter_model.safetensors``
    only, so no worker ever unpickles.
    """
    path = Path(folder)
    if (path / SAFE_WEIGHTS).is_file():
        return folder
    if not (path / PICKLE_WEIGHTS).is_file():
        raise ConfigError(f"{field}: {folder} has no {SAFE_WEIGHTS}")
    if not allow_pickle:
        raise ConfigError(f"{field}: {path / PICKLE_WEIGHTS} is a pickle, and loading a pickle can run code; "
                          f"convert it to {SAFE_WEIGHTS}, or set model.allow_pickle_adapters: true if you "
                          "trust its source")
    from raypeft.adapters.serialization import load_adapter_weights, save_adapter_weights

    try:
        weights = load_adapter_weights(path, allow_pickle=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{field}: {path / PICKLE_WEIGHTS} holds more than tensors, refused even with "
                          f"model.allow_pickle_adapters ({type(exc).__name__}: {first[:200]})") from None
    copy = Path(tempfile.mkdtemp(prefix="raypeft-adapter-"))
    shutil.copytree(path, copy, dirs_exist_ok=True, ignore=shutil.ignore_patterns(PICKLE_WEIGHTS))
    save_adapter_weights(weights, copy)
    return str(copy)


def check_adapter_fits(folder: str, field: str, skeleton_factory: Callable[[], Any]) -> None:
    """Load ``folder`` onto a weightless skeleton of the base: every tensor's shape must match.

    A meta-device load reads the adapter file (small) and compares shapes without allocating
    the base, so an adapter trained on another model fails here naming the layer.
    """
    from raypeft.adapters import AdapterModel

    try:
        AdapterModel.from_pretrained(skeleton_factory(), folder)
    except NotImplementedError:
        return  # a method whose loading needs real weights (not meta tensors): the workers check it
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{field}: {folder} does not fit model.name_or_path: {first}") from None


def check_input_adapters(cfg: RunConfig, inputs: dict[str, dict[str, str | None]],
                         order: list[str]) -> dict[str, dict[str, str | None]]:
    """Every existing input adapter: safetensors (or an allowed, converted pickle) that fits the base.

    Returns ``inputs`` with converted folders substituted. Adapters a stage of this invocation
    will write are skipped: they do not exist yet and are written by raypeft itself.
    """
    from raypeft.pipeline.modeling import skeleton_model
    from raypeft.pipeline.references import stage_fields

    done: dict[str, str] = {}
    out: dict[str, dict[str, str | None]] = {}
    for stage, roles in inputs.items():
        fields = stage_fields(cfg, stage)
        resolved: dict[str, str | None] = {}
        for role, folder in roles.items():
            field, value = fields.get(role, (f"{stage}.{role}", None))
            if folder is None or _from_this_run(value, order):
                resolved[role] = folder
                continue
            if folder not in done:
                safe = safe_adapter_folder(folder, field, allow_pickle=cfg.model.allow_pickle_adapters)
                check_adapter_fits(safe, field, lambda: skeleton_model(cfg.model))
                done[folder] = safe
            resolved[role] = done[folder]
        out[stage] = resolved
    return out


# ------------------------------------------------------------------------------ messages

@contextmanager
def quiet_progress() -> Iterator[None]:
    """No dataset progress bars while checking: a bad input must read as one line on stderr."""
    import datasets

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
    import json

    config = Path(name_or_path).expanduser() / "config.json"
    try:
        return "auto_map" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False
