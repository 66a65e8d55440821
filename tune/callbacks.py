"""Ray Train -> Ray Tune: a trial's intermediate reports, carrying the stage's latest metrics.

This is the pattern Ray Train V2 documents for Tune: the Tune function trainable builds and fits
a ``TorchTrainer`` and passes Ray Train a ``TuneReportCallback``, which forwards each
``ray.train.report`` to the trial. Stages report at their checkpoints with little more than
the step, while everything they measure goes to MLflow (flushed just before each report). So
each forwarded result is the child run's latest logged metrics (``train_loss``, ...) plus the
report's own: that is what ASHA compares at its rungs, keyed by ``step``.

The stage's final report is not forwarded: the trial reports it itself once the adapter is
published, so a scheduler decision on that result cannot cut the trial short of its adapter.
"""

from __future__ import annotations

import logging
from typing import Any

from mlflow import MlflowClient
from ray.tune.integration.ray_train import TuneReportCallback

_log = logging.getLogger(__name__)

TRIAL_TAG = "raypeft.trial_id"


def trial_run_id(client: MlflowClient, experiment_id: str, trial_id: str) -> str | None:
    """The MLflow child run of a trial (found by its tag), or None before it exists."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}'", max_results=1)
    return runs[0].info.run_id if runs else None


class StageReportsToTune(TuneReportCallback):
    """Forward intermediate stage reports to the Tune trial, merged with the run's latest metrics."""

    def __init__(self, tracking_uri: str, experiment_id: str, trial_id: str) -> None:
        super().__init__()
        self._uri = tracking_uri
        self._experiment_id = experiment_id
        self._trial_id = trial_id
        self._run_id: str | None = None

    def _latest_logged(self) -> dict[str, Any]:
        try:
            client = MlflowClient(self._uri)
            if self._run_id is None:
                self._run_id = trial_run_id(client, self._experiment_id, self._trial_id)
            if self._run_id is None:
                return {}
            return dict(client.get_run(self._run_id).data.metrics)
        except Exception as exc:  # a tracking hiccup must not end the trial; the report goes on without
            _log.warning("trial %s: could not read its MLflow metrics: %s", self._trial_id, exc)
            return {}

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        reported = dict(metrics[0]) if metrics else {}
        if reported.get("done"):
            return
        merged = {**self._latest_logged(), **reported}
        merged = {k: v for k, v in merged.items() if "/rank" not in k}
        super().after_report(run_context, [merged], None)
