"""A failure that came back through Ray, as the one line the CLI prints: its root cause and
where the full log is.

Ray Train wraps what a worker raised: ``WorkerGroupError`` (``worker_failures``: rank ->
exception), ``ControllerError`` (``controller_failure``), each worker's exception inside a
``RayTaskError`` (``cause``) whose text is a whole remote traceback. The first line of the
outer exception is ``Training failed due to worker errors:`` with nothing after the colon, so
this module walks down to the exception the user's code (or ours) raised and names it.
"""

from __future__ import annotations

from pathlib import Path

import ray

# Where a local Ray keeps its logs when the session directory cannot be asked for.
DEFAULT_LOGS = "/tmp/ray/session_latest/logs"


def _inner(exc: BaseException) -> BaseException | None:
    """The exception ``exc`` wraps, by the attributes Ray's wrappers carry (``None``: not a wrapper).
    A plain ``raise ... from`` chain is not followed: its outer message is the one written for users."""
    failures = getattr(exc, "worker_failures", None)
    if isinstance(failures, dict) and failures:
        return failures[min(failures)]
    for name in ("controller_failure", "cause"):
        inner = getattr(exc, name, None)
        if isinstance(inner, BaseException):
            return inner
    return None


def root_cause(exc: BaseException) -> BaseException:
    """The innermost exception under Ray's wrappers (``exc`` itself when nothing wraps it)."""
    seen = {id(exc)}
    while True:
        inner = _inner(exc)
        if inner is None or id(inner) in seen:
            return exc
        seen.add(id(inner))
        exc = inner


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _name(exc: BaseException) -> str:
    """``ValueError``, not ``RayTaskError(ValueError)``."""
    name = type(exc).__name__
    if name.startswith("RayTaskError(") and name.endswith(")"):
        return name[len("RayTaskError("):-1]
    return name


def failure_line(exc: BaseException) -> str:
    """``Type: first line`` of the root cause; with the worker rank and the log folder when the
    failure came through Ray."""
    root = root_cause(exc)
    first = _first_line(root)
    line = f"{_name(root)}: {first}" if first else _name(root)
    if root is exc:
        return line
    failures = getattr(exc, "worker_failures", None)
    where = f" on worker {min(failures)}" if isinstance(failures, dict) and failures else ""
    return f"{line} (raised{where} inside Ray; full log: {ray_logs()})"


def ray_logs() -> str:
    """The log folder of the Ray session this driver is part of."""
    try:
        node = ray._private.worker._global_node  # no public API names the session's folder
        if node is not None:
            return str(Path(node.get_logs_dir_path()))
    except AttributeError:
        pass
    return DEFAULT_LOGS
