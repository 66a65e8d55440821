"""What a rerun of the same command may skip or continue after a crash, and who may write an
output folder.

The driver keeps ``<output_dir>/<name>/workflow.json`` (rewritten by rename at every change):
the fingerprint of the validated config, the parent MLflow run, the driver (host and pid), and
per stage its MLflow run, ``running`` or ``finished``, and once finished the fingerprint of the
adapter it published and its final metrics. A workflow that ends (finished or failed) says so;
one whose driver was killed, or interrupted with Ctrl-C, is left ``running``.

Rerunning the same command (same config, no ``--fresh``) on a ``running`` record resumes it:
a finished stage whose published adapter is unchanged is skipped, and the stage that was
running continues in its own MLflow run from Ray Train's last checkpoint (its run folder is
named after that run, so Ray Train finds the checkpoint). Anything else starts afresh.

One driver at a time per output folder: ``output_lock`` holds an exclusive ``flock`` on
``.raypeft.lock`` for the whole workflow (the kernel drops it when the driver dies, even by
SIGKILL), so a second run of the same name is refused instead of racing the first one's
publishes.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from raypeft.pipeline.config import ConfigError

STATE_FILE = "workflow.json"
LOCK_FILE = ".raypeft.lock"
RUNNING, FINISHED, FAILED = "running", "finished", "failed"
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


@dataclass
class StageRecord:
    status: str
    run_id: str
    adapter_sha256: str | None = None
    model_version: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class WorkflowState:
    fingerprint: str
    parent_run_id: str
    driver: str
    status: str = RUNNING
    stages: dict[str, StageRecord] = field(default_factory=dict)


def this_driver() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def driver_alive(driver: str) -> bool:
    """Whether ``host:pid`` is a live process; a driver on another host counts as alive (it
    cannot be asked)."""
    host, _, pid = driver.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return host != socket.gethostname()
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def config_fingerprint(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()


def adapter_fingerprint(folder: Path) -> str | None:
    """SHA-256 over the adapter's config and weights (``None`` if either is missing)."""
    digest = hashlib.sha256()
    for name in _ADAPTER_FILES:
        path = folder / name
        if not path.is_file():
            return None
        digest.update(name.encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def load(out: Path) -> WorkflowState | None:
    try:
        raw = json.loads((out / STATE_FILE).read_text())
        stages = {k: StageRecord(**v) for k, v in raw.pop("stages", {}).items()}
        return WorkflowState(**raw, stages=stages)
    except (OSError, ValueError, TypeError):
        return None


def save(out: Path, state: WorkflowState) -> None:
    tmp = out / f".{STATE_FILE}.{os.getpid()}"
    tmp.write_text(json.dumps(asdict(state), indent=1, default=str))
    os.replace(tmp, out / STATE_FILE)


def resumable(state: WorkflowState | None, fingerprint: str) -> WorkflowState | None:
    """``state`` if a rerun continues it: left running by a driver that is gone, same config."""
    if state is None or state.status != RUNNING or state.fingerprint != fingerprint:
        return None
    return state


def finished_record(state: WorkflowState | None, stage: str, adapter_dir: Path) -> StageRecord | None:
    """The record of ``stage`` if it finished and its published adapter is still the one it wrote."""
    record = state.stages.get(stage) if state else None
    if record is None or record.status != FINISHED or record.adapter_sha256 is None:
        return None
    return record if adapter_fingerprint(adapter_dir) == record.adapter_sha256 else None


def interrupted_run(state: WorkflowState | None, stage: str) -> str | None:
    """The MLflow run of ``stage`` if it was running when the driver stopped."""
    record = state.stages.get(stage) if state else None
    return record.run_id if record is not None and record.status == RUNNING else None


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold ``out``'s lock for the block, or refuse (``ConfigError``) while another driver holds it."""
    out.mkdir(parents=True, exist_ok=True)
    fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            raise ConfigError(f"output_dir: another raypeft run ({holder}) is writing {out}; wait for it to end, "
                              "or give this run another name") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, this_driver().encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the lock
