"""Is the metric a sweep optimises (or early-stops on) one its stage logs? Checked before any
trial trains.

A misspelt or foreign metric (``rougel_after``, or the reward stage's ``eval_accuracy_after``
in an SFT sweep) used to let every trial train and then fail the sweep for want of the value.
The names come from the stage's definition (``Stage.metrics``, ``pipeline.stages.definition``);
names with a ``/`` (per worker, per reward function) are open-ended and pass.
"""

from __future__ import annotations

import difflib

from raypeft.pipeline.config import STAGES
from raypeft.pipeline.stages.registry import stage_named
from raypeft.tune.schema import SweepConfig, SweepError


def check_metric(field: str, metric: str, stage: str) -> None:
    """Refuse ``metric`` (the sweep field ``field``) unless the ``stage`` stage logs it."""
    known = stage_named(stage).logged_metrics()
    if "/" in metric or metric in known:
        return
    close = difflib.get_close_matches(metric, sorted(known), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f" (it logs e.g. {', '.join(sorted(known)[:6])}, ...)"
    others = [s for s in STAGES if s != stage and metric in stage_named(s).logged_metrics()]
    where = f"'{metric}' is logged by the {others[0]} stage, not by {stage}" if others else \
        f"the {stage} stage logs no metric '{metric}'"
    raise SweepError(f"{field}: {where}{hint}")


def check_sweep_metrics(sweep: SweepConfig) -> None:
    """The sweep's ``metric`` and, with a scheduler, ``scheduler.metric``."""
    check_metric("metric", sweep.metric, sweep.stage)
    if sweep.scheduler.type != "none":
        check_metric("scheduler.metric", sweep.scheduler.metric, sweep.stage)
