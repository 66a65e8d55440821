"""Ray Tune's Optuna searcher, fed only the results that carry the sweep's final metric.

Optuna is an optional extra: Ray's ``OptunaSearch`` module imports without it and fails only when
a searcher is built, which ``tune.searchers`` does after ``require_optuna`` has checked (one line).
"""

from __future__ import annotations

from typing import Any

from ray.tune.search.optuna import OptunaSearch


class FinalMetricOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that ignores intermediate results without its metric.

    Intermediate reports of a stage carry ``train_loss`` and the step; a metric such as
    ``rougeL_after`` appears only in the trial's last result, which ``on_trial_complete``
    receives. Early stopping is the scheduler's job (ASHA), not Optuna's pruner.
    """

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if isinstance(self.metric, str) and self.metric in result:
            super().on_trial_result(trial_id, result)
