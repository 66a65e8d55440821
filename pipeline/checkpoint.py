"""The layout of a stage checkpoint folder, and its completeness marker.

A checkpoint folder holds ``adapter/`` (the PEFT-format adapter: loadable by raypeft or peft on
its own; for a multi-role stage the primary role's, with any other trained role -- the PPO
critic -- under ``roles/<role>/``, see ``pipeline.roles``), the backend's trainer state
(``trainer_state.pt`` for plain PyTorch: optimiser, schedule, step and stage-specific state such
as ROUGE before training; DeepSpeed's own partitioned files under ``deepspeed/``) and, written
last, ``checkpoint.json``. The frozen base is never written: it is reloaded from its source.

Writing and restoring are the backends' (``pipeline.backends``: ``Backend.save`` /
``Backend.restore`` / ``report_checkpoint``); this module only names the files and decides
whether a folder is whole. A folder without the marker is a checkpoint whose writer died
part-way, and is never restored.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

ADAPTER_DIR = "adapter"
STATE_FILE = "trainer_state.pt"
META_FILE = "checkpoint.json"


def mark_complete(folder: Path, state: Mapping[str, Any]) -> None:
    """Write the marker; called after every other file of the checkpoint is in place."""
    (folder / META_FILE).write_text(json.dumps({"step": state.get("step"), "complete": True}))


def is_complete(folder: Path) -> bool:
    meta = folder / META_FILE
    return meta.is_file() and json.loads(meta.read_text()).get("complete") is True


def require_complete(folder: Path) -> None:
    """Refuse a folder whose writer stopped before the marker."""
    if not is_complete(folder):
        raise RuntimeError(f"{folder}: checkpoint is incomplete (its writer stopped part-way)")


def checkpoint_step(folder: str | Path) -> int | None:
    """The optimiser step a checkpoint was written at, if its marker says so."""
    try:
        return int(json.loads((Path(folder) / META_FILE).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
