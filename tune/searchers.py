"""The search algorithm and scheduler objects a sweep hands to Ray Tune.

Optuna is optional (``pip install 'raypeft[optuna]'``); asking for it without it installed is
a one-line ``SweepError`` on the driver, before Ray starts.

Two Tune rules shape this module. The scheduler and the searcher may watch different metrics
(ASHA the intermediate ``train_loss``, the searcher the final ``rougeL_after``), so neither is
passed to ``TuneConfig``; and the final metric exists only in a trial's last result, so the
Optuna searcher skips intermediate results that lack it instead of failing on them.
"""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler
from ray.tune.search.basic_variant import BasicVariantGenerator

from raypeft.tune.optuna_search import FinalMetricOptunaSearch
from raypeft.tune.schema import SchedulerSpec, SweepConfig, SweepError
from raypeft.tune.space import SearchSpace

UNBOUNDED_T = 10**9  # ASHA's max_t when none is given: never stop a trial for its length alone


def require_optuna() -> None:
    try:
        import optuna  # noqa: F401
    except ImportError:
        raise SweepError("search_alg: optuna is not installed; pip install 'raypeft[optuna]' "
                         "(optuna>=3.0), or use search_alg grid or random") from None


def scheduler(spec: SchedulerSpec) -> Any:
    """Tune's scheduler for ``spec`` (None for ``type: none``: Tune's FIFO)."""
    if spec.type == "none":
        return None
    max_t = spec.max_t or UNBOUNDED_T
    if spec.grace_period > max_t:
        raise SweepError(f"scheduler.grace_period: {spec.grace_period} is beyond scheduler.max_t={max_t}")
    return ASHAScheduler(time_attr=spec.time_attr, metric=spec.metric, mode=spec.mode, max_t=max_t,
                         grace_period=spec.grace_period, reduction_factor=spec.reduction_factor)


def search_algorithm(sweep: SweepConfig, space: SearchSpace) -> Any:
    """The Tune search algorithm: Tune's variant generator for grid/random, Optuna's TPE otherwise."""
    if sweep.search_alg == "optuna":
        require_optuna()
        return FinalMetricOptunaSearch(space=space.optuna_define(), metric=sweep.metric, mode=sweep.mode,
                                       seed=sweep.seed)
    # Tune applies TuneConfig.max_concurrent_trials to Searchers only; the variant generator
    # takes its own limit.
    return BasicVariantGenerator(random_state=sweep.seed, max_concurrent=sweep.max_concurrent_trials or 0)


def concurrency_for_tune_config(sweep: SweepConfig) -> int | None:
    """``TuneConfig.max_concurrent_trials``: for Searchers (Optuna) only, see ``search_algorithm``."""
    return sweep.max_concurrent_trials if sweep.search_alg == "optuna" else None
