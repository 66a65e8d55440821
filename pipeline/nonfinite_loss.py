"""Stop a stage cleanly when its loss stops being a number.

A NaN or infinite loss poisons the adapter on the next update and never recovers; retrying from
the last checkpoint (``failure.max_failures``) would only reach the same step again. So:

* worker side, every stage loop calls :func:`check_finite` on each loss before ``backward``.
  The verdict is agreed over all workers (one tiny all-reduce), so every rank stops at the same
  step and Ray Train's report counts stay equal. The bad update is never applied.
* :func:`stop_on_nonfinite` wraps a stage's loop: on :class:`NonFiniteLoss` it flushes the
  metrics logged so far, leaves the verdict in a small file next to the run's checkpoints and
  ends the loop *normally*. Raising instead would make Ray Train restart the worker group (and
  a report would not do: Ray's ``Result`` only carries the metrics of the latest checkpoint).
* driver side, :func:`raise_if_stopped` turns that file into :class:`NonFiniteLoss`
  naming the step and the last good checkpoint (Ray's latest, written before the bad step and
  kept in ``<output_dir>/<name>/ray``), so the stage's MLflow run ends FAILED and the CLI exits
  non-zero.
"""

from __future__ import annotations

import functools
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import ray.train
import torch

from raypeft.pipeline import engine, tracking
from raypeft.pipeline.checkpoint import checkpoint_step

STOP_FILE = "nonfinite_file"  # payload key: where rank 0 leaves the verdict


class NonFiniteLoss(RuntimeError):
    """The loss of ``stage`` was NaN or infinite at ``step`` (1-based optimiser step)."""

    def __init__(self, stage: str, step: int, kind: str, detail: str = "") -> None:
        self.stage, self.step, self.kind, self.detail = stage, step, kind, detail
        super().__init__(f"{stage}: loss is {kind} at step {step}; the stage stopped before applying that "
                         f"update{detail}")

    def __reduce__(self):
        # Ray pickles a worker's exception back to the driver; the default reduce would call
        # __init__ with the message alone.
        return (type(self), (self.stage, self.step, self.kind, self.detail))


def _kind(loss: torch.Tensor | float) -> tuple[float, float]:
    """``(nan, inf)`` flags of one loss value (a tensor of any shape or a float)."""
    if isinstance(loss, torch.Tensor):
        value = loss.detach()
        return float(torch.isnan(value).any()), float(torch.isinf(value).any())
    return float(math.isnan(loss)), float(math.isinf(loss))


def check_finite(loss: torch.Tensor | float, *, stage: str, step: int) -> None:
    """Raise :class:`NonFiniteLoss` on every worker if any worker's ``loss`` is NaN or infinite.

    Call it on every rank at the same point of the loop (after the forward, before ``backward``):
    the flags are summed over workers, on the loss's device (gloo on CPU, NCCL on GPU).
    """
    device = loss.device if isinstance(loss, torch.Tensor) else None
    nan, inf = engine.all_reduce(list(_kind(loss)), op="sum", device=device)
    if nan or inf:
        raise NonFiniteLoss(stage, step, "nan" if nan else "inf")


def stop_on_nonfinite(loop: Callable[[dict], None]) -> Callable[[dict], None]:
    """``loop`` that returns normally, leaving a verdict file, when the loss goes non-finite.

    ``payload[STOP_FILE]`` names the file (in the run's storage folder, which every node sees as
    it sees the checkpoints); rank 0 writes it. Every rank stops at the same step, so Ray Train's
    report counts stay equal.
    """

    @functools.wraps(loop)
    def guarded(payload: dict) -> None:
        try:
            loop(payload)
        except NonFiniteLoss as exc:
            tracking.RunLogger.flush_open()  # the steps before the bad one stay in MLflow
            if ray.train.get_context().get_world_rank() == 0:
                engine.say(f"[{exc.stage}] {exc}")
                _write_verdict(Path(payload[STOP_FILE]), {"stage": exc.stage, "step": exc.step, "kind": exc.kind})

    return guarded


def _write_verdict(path: Path, verdict: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(verdict))
    os.replace(tmp, path)  # whole or absent


def stop_file(run_folder: Path) -> Path:
    """Where a stopped stage leaves its verdict (inside Ray Train's folder for the run)."""
    return run_folder / "nonfinite.json"


def raise_if_stopped(result: Any, verdict_file: Path) -> Any:
    """``result`` (a Ray Train ``Result``) unless the loop left a non-finite-loss verdict."""
    try:
        verdict = json.loads(Path(verdict_file).read_text())
    except FileNotFoundError:
        return result
    checkpoint = getattr(result, "checkpoint", None)
    if checkpoint is not None:
        step = checkpoint_step(checkpoint.path)
        detail = f"; last good checkpoint{f' (step {step})' if step is not None else ''}: {checkpoint.path}"
    else:
        detail = "; no checkpoint had been written yet"
    raise NonFiniteLoss(str(verdict["stage"]), int(verdict["step"]), str(verdict["kind"]),
                        detail + " (lower the learning rate, check the data, or set max_grad_norm)")
