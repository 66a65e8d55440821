"""Stage checkpoints: only what training changed, reported through Ray Train.

A checkpoint folder holds ``adapter/`` (the PEFT-format adapter: loadable by raypeft or peft on
its own; for a multi-role stage the primary role's, with any other trained role -- the PPO
critic -- under ``roles/<role>/``, see ``pipeline.roles``) and ``trainer_state.pt``
(optimiser, schedule, step and stage-specific state such as ROUGE before training). The frozen
base is never written: it is reloaded from its source. Ray Train copies the folder into its
storage; on restart ``ray.train.get_checkpoint()`` hands the latest one back and ``restore``
puts the loop where it was.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import torch

from raypeft.adapters import AdapterModel

if TYPE_CHECKING:
    from raypeft.pipeline.roles import Roles

ADAPTER_DIR = "adapter"
STATE_FILE = "trainer_state.pt"
META_FILE = "checkpoint.json"


def write(folder: Path, model: AdapterModel | Roles, optimizer: torch.optim.Optimizer,
          scheduler: Any, state: Mapping[str, Any]) -> None:
    """Write a complete checkpoint into ``folder`` (an empty temp dir Ray will copy)."""
    if isinstance(model, AdapterModel):
        model.save_pretrained(str(folder / ADAPTER_DIR))
    else:
        model.save_trainables(folder, ADAPTER_DIR)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "state": dict(state)},
               folder / STATE_FILE)
    # Written last: a folder without it is a checkpoint whose writer died part-way.
    (folder / META_FILE).write_text(json.dumps({"step": state.get("step"), "complete": True}))


def is_complete(folder: Path) -> bool:
    meta = folder / META_FILE
    return meta.is_file() and json.loads(meta.read_text()).get("complete") is True


def restore(folder: Path, model: AdapterModel | Roles, optimizer: torch.optim.Optimizer, scheduler: Any,
            adapter_name: str = "default") -> dict[str, Any]:
    """Load adapter weights, optimiser and schedule from ``folder``; return the saved state."""
    if not is_complete(folder):
        raise RuntimeError(f"{folder}: checkpoint is incomplete (its writer stopped part-way)")
    if isinstance(model, AdapterModel):
        from raypeft.adapters.serialization import load_adapter_weights

        model.load_adapter_state_dict(load_adapter_weights(folder / ADAPTER_DIR), adapter_name)
    else:
        model.load_trainables(folder, ADAPTER_DIR)
    blob = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(blob["optimizer"])
    scheduler.load_state_dict(blob["scheduler"])
    return blob["state"]


def report(metrics: Mapping[str, float], *, model: AdapterModel | Roles | None = None,
           optimizer: torch.optim.Optimizer | None = None, scheduler: Any = None,
           state: Mapping[str, Any] | None = None) -> None:
    """``ray.train.report`` from every worker; the worker that passes ``model`` attaches a checkpoint.

    Ray Train V2 expects every worker to report the same number of times, so non-main workers
    call this with metrics only.
    """
    import ray.train

    if model is None:
        ray.train.report(dict(metrics), checkpoint=None)
        return
    with tempfile.TemporaryDirectory(prefix="raypeft-ckpt-") as tmp:
        write(Path(tmp), model, optimizer, scheduler, state or {})
        ray.train.report(dict(metrics), checkpoint=ray.train.Checkpoint.from_directory(tmp))
