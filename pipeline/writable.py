"""Can raypeft write where a run will write? Answered on the driver before anything is written.

A run writes its output folder (``<output_dir>/<name>``: the config, Ray Train's checkpoints,
the published adapters) and, for a local tracking store, a SQLite file or a ``file:`` folder.
An ``output_dir`` that is a file, lies under a file or is read-only, or a store in a read-only
folder, would otherwise fail after the MLflow runs exist (SQLite after a minute of MLflow's
retries). The check walks up to the nearest folder that exists and asks whether this process
may create entries in it; the kernel is then asked for real with a probe folder that is removed
at once (``os.access`` says yes to root even where a read-only mount or procfs says no).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest ancestor that exists."""
    current = path
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def _can_create_in(folder: Path) -> bool:
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".raypeft-probe-", dir=folder))
    except OSError:
        return False
    return True


def folder_problem(path: Path) -> str | None:
    """Why this process cannot make ``path`` a folder and write in it (``None``: it can)."""
    path = Path(os.path.abspath(path))
    existing = nearest_existing(path)
    if not existing.is_dir():
        return f"{existing} is a file, not a folder" if existing == path else \
            f"{path} lies under {existing}, which is a file, not a folder"
    if not _can_create_in(existing):
        return f"cannot write in {existing} (read-only, or permission denied)"
    return None


def file_problem(path: Path) -> str | None:
    """Why this process cannot create or update the file ``path`` and its neighbours (SQLite
    writes a journal beside the database), or ``None``."""
    path = Path(os.path.abspath(path))
    if path.exists() and not path.is_file():
        return f"{path} is not a file"
    if path.exists() and not os.access(path, os.R_OK | os.W_OK):
        return f"cannot write {path} (read-only, or permission denied)"
    if not path.parent.is_dir():
        return None  # the caller names a missing folder in its own words
    return None if _can_create_in(path.parent) else f"cannot write in {path.parent} (read-only, or permission denied)"
