"""MLflow tracking and the Model Registry of adapters.

The driver owns the runs: it creates one parent run per workflow and one child run per stage,
and hands the child's ``run_id`` to the Ray Train workers. Only rank 0 logs step metrics
(through ``RunLogger``), so a SQLite store never sees concurrent writers; per-worker figures
(memory, tokens/s) are gathered to rank 0 first. After a stage the driver logs the adapter
folder as an artifact and registers it as a new model version.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import weakref
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

_log = logging.getLogger(__name__)

ADAPTER_ARTIFACT = "adapter"


class TrackingError(RuntimeError):
    """The tracking server or registry could not do what was asked (one line)."""


def connect(tracking_uri: str, experiment: str, artifact_location: str | None = None) -> str:
    """Point MLflow at ``tracking_uri`` and return the experiment id, creating it if needed.

    A fresh experiment gets ``artifact_location`` so local runs keep artifacts next to the
    SQLite file instead of wherever the process happened to start.
    """
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    try:
        exp = client.get_experiment_by_name(experiment)
    except Exception as exc:  # connection errors surface as many exception types
        raise TrackingError(f"tracking.uri: cannot reach MLflow at {tracking_uri}: {exc}") from None
    if exp is not None:
        return exp.experiment_id
    return client.create_experiment(experiment, artifact_location=artifact_location)


def start_run(experiment_id: str, name: str, *, parent_run_id: str | None = None,
              tags: Mapping[str, str] | None = None) -> str:
    """Create a run (a child when ``parent_run_id`` is given) and return its id, left open."""
    client = MlflowClient()
    run_tags = dict(tags or {})
    if parent_run_id:
        run_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=name, tags=run_tags)
    return run.info.run_id


def end_run(run_id: str, status: str = "FINISHED") -> None:
    MlflowClient().set_terminated(run_id, status=status)


def reopen_run(run_id: str) -> None:
    """Mark a run RUNNING again: a rerun after a crash continues it instead of starting another."""
    MlflowClient().update_run(run_id, status="RUNNING")


def stale_runs(experiment_id: str, workflow: str) -> list[tuple[str, str]]:
    """``(run id, driver)`` of this workflow's runs still RUNNING, with the driver that opened them
    (tag ``raypeft.driver``, ``host:pid``; runs without it are left alone)."""
    runs = MlflowClient().search_runs(
        [experiment_id], filter_string=f"tags.`raypeft.workflow` = '{workflow}' and attributes.status = 'RUNNING'",
        max_results=1000)
    return [(r.info.run_id, r.data.tags["raypeft.driver"]) for r in runs if "raypeft.driver" in r.data.tags]


def log_params(run_id: str, params: Mapping[str, Any]) -> None:
    """Log a flat mapping of params; values are stringified and cut to MLflow's limit."""
    client = MlflowClient()
    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i:i + 100])


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}} -> {"a.b": 1}``: the resolved config as MLflow params."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


def log_metrics(run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
    now = int(time.time() * 1000)
    batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
    if batch:
        MlflowClient().log_batch(run_id, metrics=batch)


def set_tags(run_id: str, tags: Mapping[str, Any]) -> None:
    MlflowClient().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


class RunLogger:
    """Rank 0's handle on the stage run: buffers step metrics and flushes them in batches.

    Workers receive only the tracking URI and the run id; this keeps them from creating runs
    of their own (a restarted worker continues the same run instead of starting a new one).

    A worker group that Ray Train restarts after a failure replays the steps between its last
    checkpoint and the crash, and some of those were already flushed. So the logger first reads
    how far each metric of the run got, and drops a replayed point at or below that step: every
    step appears once in MLflow, whether or not a worker died.
    """

    # Loggers of this process, so a loop that stops on an exception can still flush what it logged.
    _open: "weakref.WeakSet[RunLogger]" = weakref.WeakSet()

    def __init__(self, tracking_uri: str, run_id: str, *, enabled: bool = True, flush_every: int = 50):
        self.run_id = run_id
        RunLogger._open.add(self)
        self.enabled = enabled
        self._flush_every = flush_every
        self._buffer: list[Metric] = []
        self._client = MlflowClient(tracking_uri) if enabled else None
        self._logged_through: dict[str, int] = self._read_progress() if enabled else {}

    def _read_progress(self) -> dict[str, int]:
        keys = self._client.get_run(self.run_id).data.metrics.keys()
        return {k: max(m.step for m in self._client.get_metric_history(self.run_id, k)) for k in keys}

    def log(self, metrics: Mapping[str, float], step: int) -> None:
        if not self.enabled:
            return
        now = int(time.time() * 1000)
        self._buffer.extend(Metric(k, float(v), now, step) for k, v in metrics.items()
                            if v is not None and step > self._logged_through.get(k, -1))
        if len(self._buffer) >= self._flush_every:
            self.flush()

    @classmethod
    def flush_open(cls) -> None:
        """Flush every logger of this process that still holds buffered points."""
        for logger in list(cls._open):
            logger.flush()

    def flush(self) -> None:
        if self.enabled and self._buffer:
            for i in range(0, len(self._buffer), 1000):
                self._client.log_batch(self.run_id, metrics=self._buffer[i:i + 1000])
            self._buffer = []


def directory_size(path: str | Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def log_adapter(run_id: str, adapter_dir: str | Path) -> str:
    """Upload the adapter folder as the run's ``adapter`` artifact; return its ``runs:/`` URI."""
    MlflowClient().log_artifacts(run_id, str(adapter_dir), ADAPTER_ARTIFACT)
    return f"runs:/{run_id}/{ADAPTER_ARTIFACT}"


def register_adapter(name: str, source: str, run_id: str, *, tags: Mapping[str, Any],
                     description: str | None = None, alias: str | None = None) -> int:
    """Register ``source`` (a ``runs:/`` URI of an adapter folder) as a new version of ``name``.

    Adapters are plain folders in PEFT format, not MLflow flavours: registering the artifact
    path keeps ``models:/name@alias`` downloadable with ``mlflow.artifacts.download_artifacts``
    and loadable by raypeft or by ``peft.PeftModel.from_pretrained``.
    """
    client = MlflowClient()
    str_tags = {k: str(v) for k, v in tags.items() if v is not None}
    try:  # create-or-get: two runs registering the first version of one name at once must both succeed
        client.create_registered_model(name, description=description or "raypeft adapters")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, source=source, run_id=run_id, tags=str_tags,
                                          description=description)
    if alias:
        client.set_registered_model_alias(name, alias, version.version)
    return int(version.version)


def is_registry_uri(ref: str) -> bool:
    return ref.startswith("models:/") or ref.startswith("runs:/")


def resolve_adapter(ref: str, *, tracking_uri: str | None = None, dst: str | Path | None = None) -> Path:
    """Turn a folder, ``runs:/...`` or ``models:/NAME/VERSION|@ALIAS`` into a local adapter folder."""
    if not is_registry_uri(ref):
        path = Path(ref).expanduser()
        if not path.exists():
            raise TrackingError(f"{ref}: not an adapter folder (it does not exist; an adapter input is a "
                                "folder with adapter_config.json, a stage name, or a models:/ URI)")
        if not (path / "adapter_config.json").is_file():
            raise TrackingError(f"{ref}: not an adapter folder (no adapter_config.json)")
        return path.resolve()
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    target = str(dst) if dst else tempfile.mkdtemp(prefix="raypeft-adapter-")
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=target)
    except Exception as exc:
        raise TrackingError(f"{ref}: cannot resolve ({str(exc).splitlines()[0]})") from None
    path = Path(local)
    if not (path / "adapter_config.json").is_file():
        raise TrackingError(f"{ref}: resolved to {path}, which holds no adapter_config.json")
    return path


@contextmanager
def quiet_mlflow() -> Iterator[None]:
    """MLflow's database migrations and download bars are noise in a training log."""
    names = ["mlflow", "alembic"]
    levels = {n: logging.getLogger(n).level for n in names}
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    for n in names:
        logging.getLogger(n).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for n, lvl in levels.items():
            logging.getLogger(n).setLevel(lvl)


def log_artifact_file(run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    MlflowClient().log_artifact(run_id, str(path), artifact_path)
