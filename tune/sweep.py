"""The sweep driver: check everything, run the trials in Ray Tune, summarise, register the best.

Order of work, as for a workflow: everything that can be checked without training is checked
before Ray starts (the sweep file, the base config, every trial config the space can produce,
adapter targets per method, the stage's data and input adapters, the tracking store). Then one
MLflow parent run for the sweep; each trial is a child run (``tune.trials``). After Tune
returns, the driver settles each child run's status (an early-stopped trial's actor is ended
by Tune, so its run is closed here as KILLED; a failed trial's as FAILED with the error),
writes the summary table, CSV and plot as parent artifacts, and registers the best trial's
adapter as a new model version carrying the alias (default ``best``) and the sweep's name.
"""

from __future__ import annotations

import json
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml
from mlflow import MlflowClient
from ray import tune
from ray.tune import Callback

from raypeft.pipeline import launcher, tracking
from raypeft.pipeline.adapter_inputs import stage_fields
from raypeft.pipeline.config import STAGES, ConfigError, RunConfig, apply_overrides, load_config, parse_config
from raypeft.pipeline.modeling import check_adapter_targets
from raypeft.pipeline.preflight import preflight
from raypeft.tune import searchers
from raypeft.tune.callbacks import TRIAL_TAG
from raypeft.tune.cleanup import OrphanedGroupReaper
from raypeft.tune.metric_names import check_sweep_metrics
from raypeft.tune.schema import SweepConfig, SweepError, base_config_path
from raypeft.tune.space import SearchSpace, adapter_field, describe
from raypeft.tune.summary import COMPLETED, FAILED, STOPPED, TrialRow, markdown_table, plot, ranked, write_csv
from raypeft.tune.trials import COMPLETED_KEY, SWEEP_TAG, TrialContext, run_trial, set_dotted, trial_data


@dataclass
class SweepOutcome:
    name: str
    parent_run_id: str
    out_dir: Path
    rows: list[TrialRow]
    best: TrialRow | None
    registered_name: str | None
    registered_version: int | None
    seconds: float
    table: str


@dataclass
class PreparedSweep:
    """The sweep with its base config resolved and every trial config checked."""

    sweep: SweepConfig
    base_path: Path
    base_data: dict[str, Any]
    base_cfg: RunConfig
    space: SearchSpace
    points: list[dict[str, Any]]
    trial_count: int


# ------------------------------------------------------------------------------ checks

def _read_base(sweep: SweepConfig, sweep_file: str | Path, overrides: list[str]) -> tuple[Path, dict, RunConfig]:
    path = base_config_path(sweep, sweep_file)
    if not path.is_file():
        raise SweepError(f"base_config: {path} not found")
    items = list(sweep.overrides) + list(overrides)
    try:
        load_config(path, items)  # YAML errors and field errors with the file's own wording
        data = yaml.safe_load(path.read_text()) or {}
        apply_overrides(data, items)
        data["stages"] = [sweep.stage]
        cfg = parse_config(data, origin=str(path))
    except ConfigError as exc:
        raise SweepError(f"base_config ({path.name}): {exc}") from None
    return path, data, cfg


def _attr(cfg: RunConfig, dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _pin_inputs(cfg: RunConfig, data: dict, stage: str, inputs: dict[str, str | None]) -> None:
    """Replace stage-name and registry inputs with the folders the driver resolved, so every
    trial (each with its own output folder) reads the same adapter without downloading it."""
    for role, (field, _) in stage_fields(cfg, stage).items():
        raw = _attr(cfg, field)
        if isinstance(raw, str) and (raw in STAGES or tracking.is_registry_uri(raw)) and inputs.get(role):
            set_dotted(data, field, inputs[role])


def _check_trials(prep: PreparedSweep, resources: dict | None) -> None:
    """Build every trial config the space can produce (ranges at both ends) and check adapter
    targets once per distinct adapter block; the first problem names the trial's values."""
    seen_keys: set[str] = set()
    adapters: dict[str, tuple[str, RunConfig]] = {}
    for assignment in prep.space.check_assignments():
        seen_keys.update(assignment)
        try:
            data = trial_data(prep.base_data, assignment, prep.space.methods, stage=prep.sweep.stage,
                              output_dir=str(prep.base_cfg.output_path()), resources=resources)
            cfg = parse_config(data)
        except ConfigError as exc:
            raise SweepError(f"search_space: the trial [{describe(assignment)}] is not a valid config: {exc}") from None
        adapters.setdefault(json.dumps(cfg.adapter.model_dump(mode="json"), sort_keys=True),
                            (describe(assignment), cfg))
    for param in prep.space.params:
        if param.key not in seen_keys:
            field = adapter_field(param.key)
            if field is not None:
                why = (f"'{field}' is not a field of any adapter method in this sweep "
                       f"({', '.join(prep.space.methods_in_play())})")
            else:
                why = "its 'when' conditions never hold"
            raise SweepError(f"search_space.{param.key}: applies to no trial: {why}")
    for label, cfg in adapters.values():
        try:
            check_adapter_targets(cfg.adapter, cfg.model)
        except ConfigError as exc:
            raise SweepError(f"search_space: the trial [{label}]: {exc}") from None


def prepare(sweep: SweepConfig, sweep_file: str | Path, base_overrides: list[str] | None = None) -> PreparedSweep:
    """Everything short of starting Ray: raises ``SweepError`` (or ``DataError`` / ``TrackingError``)."""
    check_sweep_metrics(sweep)  # before the base config, the data or the store are touched
    base_path, data, cfg = _read_base(sweep, sweep_file, base_overrides or [])
    space = SearchSpace.build(sweep.search_space, cfg, sweep.search_alg)
    if sweep.search_alg == "optuna":
        searchers.require_optuna()
    if sweep.scheduler.type != "none":
        searchers.scheduler(sweep.scheduler)
    track = data.setdefault("tracking", {})
    track["uri"] = cfg.tracking_uri()
    artifacts = cfg.artifact_location()
    if artifacts:
        track["artifact_location"] = artifacts
    points = space.grid_points() if sweep.search_alg != "optuna" else []
    prep = PreparedSweep(sweep, base_path, data, parse_config(data), space, points,
                         space.trial_count(sweep.search_alg, sweep.num_samples))
    _check_trials(prep, _resources(sweep))
    return prep


def _resources(sweep: SweepConfig) -> dict | None:
    return sweep.resources.model_dump() if sweep.resources is not None else None


# ------------------------------------------------------------------------------ Tune

def trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


@contextmanager
def _environment() -> Iterator[None]:
    """Trials run in the driver's working directory (relative data paths keep working), and Tune
    accepts results without the final metric (only a trial's last result has it)."""
    saved = {k: os.environ.get(k) for k in ("RAY_CHDIR_TO_TRIAL_DIR", "TUNE_DISABLE_STRICT_METRIC_CHECKING")}
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


TRIAL_ACTOR_MEMORY = 256 * 1024**2


def _trial_actor_resources(sweep: SweepConfig) -> dict[str, float]:
    """What the Tune actor of a trial asks for. It only drives Ray Train, so by default no CPU
    (a CPU slot per trial would leave a 2-core machine room for one trial); Tune refuses an
    empty request, so it asks for a little of Ray's ``memory`` resource instead."""
    cpus = sweep.resources.trial_cpus if sweep.resources else 0.0
    return {"CPU": cpus} if cpus > 0 else {"CPU": 0, "memory": TRIAL_ACTOR_MEMORY}


def _release_ended_trials(reaper: OrphanedGroupReaper, seconds: int = 5) -> None:
    """The last trials Tune ended may still hold worker groups whose controller dies just after
    ``fit`` returns: a few more passes give those resources back to the cluster."""
    for _ in range(seconds):
        time.sleep(1.0)
        reaper(force=True)


def _tuner(prep: PreparedSweep, ctx: TrialContext, out_dir: Path, progress: "TrialProgress"):
    sweep = prep.sweep
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), _trial_actor_resources(sweep))
    param_space = prep.space.tune_param_space(prep.points) if sweep.search_alg != "optuna" else {}
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            search_alg=searchers.search_algorithm(sweep, prep.space),
            scheduler=searchers.scheduler(sweep.scheduler),
            num_samples=sweep.num_samples,
            max_concurrent_trials=searchers.concurrency_for_tune_config(sweep),
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(name="tune", storage_path=str(out_dir), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=0),
                                  callbacks=[progress]),
    )


class TrialProgress(Callback):
    """One line per trial event on the driver (Tune's own result tables are turned off), and the
    release of early-stopped trials' worker resources between Tune's steps (``tune.cleanup``)."""

    def __init__(self, prep: PreparedSweep, log: Callable[[str], None]) -> None:
        self.prep = prep
        self.log = log
        self.reaper = OrphanedGroupReaper()

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        self.reaper()

    def _label(self, trial: Any) -> str:
        return f"trial {trial.trial_id} [{describe(self.prep.space.resolve(trial.config, self.prep.points))}]"

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.log(f"[raypeft] {self._label(trial)} started")

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        last = trial.last_result or {}
        if last.get(COMPLETED_KEY):
            metric = self.prep.sweep.metric
            self.log(f"[raypeft] {self._label(trial)} done: {metric}={last.get(metric, float('nan')):.4f}")
        else:
            time_attr = self.prep.sweep.scheduler.time_attr
            self.log(f"[raypeft] {self._label(trial)} stopped early by the scheduler at "
                     f"{time_attr} {last.get(time_attr, '?')}")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.log(f"[raypeft] {self._label(trial)} failed (the sweep goes on)")


# ------------------------------------------------------------------------------ results

def _first_line(error: Any) -> str:
    text = str(error).strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    # Ray wraps the trial's exception and prints its chain from the first cause on: the first
    # "SomeError: message" line that is not Ray's own wrapper is the root cause.
    for ln in lines:
        match = re.match(r"([A-Za-z_][\w.]*): \S", ln)
        if match and match.group(1) != "ray" and not match.group(1).startswith("ray."):
            return ln[:500]
    return (lines[0] if lines else type(error).__name__)[:500]


def _row(prep: PreparedSweep, trial_id: str, config: dict, status: str, error: str | None,
         run: Any | None, out_dir: Path) -> TrialRow:
    params = prep.space.resolve(config, prep.points) if config else {}
    row = TrialRow(trial_id=trial_id, status=status, params=params, error=error)
    try:
        cfg = parse_config(trial_data(prep.base_data, params, prep.space.methods, stage=prep.sweep.stage,
                                      output_dir=str(out_dir / "trials" / trial_id),
                                      resources=_resources(prep.sweep)))
    except ConfigError:
        cfg = None
    if cfg is not None:
        adapter = cfg.adapter
        row.method = adapter.method
        row.r = getattr(adapter, "r", None)
        row.alpha = getattr(adapter, "lora_alpha", getattr(adapter, "alpha", None))
        row.tokens = getattr(adapter, "num_virtual_tokens", None)
        row.lr = getattr(getattr(cfg, prep.sweep.stage), "learning_rate", None)
    if run is not None:
        m = dict(run.data.metrics)
        row.metrics = m
        row.run_id = run.info.run_id
        row.metric = m.get(prep.sweep.metric)
        row.trainable_params = m.get("trainable_params")
        row.adapter_bytes = m.get("adapter_size_bytes")
        row.memory_mib = m.get("peak_gpu_allocated_mib", m.get("peak_rss_mib"))
        row.train_s = m.get("train_seconds")
        end = run.info.end_time or int(time.time() * 1000)
        row.wall_s = (end - run.info.start_time) / 1000.0
    return row


def _settle_runs(prep: PreparedSweep, results: Any, parent: str, experiment_id: str, out_dir: Path) -> list[TrialRow]:
    """One row per Tune trial, with its child run closed in the status the trial ended in."""
    client = MlflowClient()
    children = {r.data.tags.get(TRIAL_TAG): r for r in client.search_runs(
        [experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'", max_results=5000)}
    rows: list[TrialRow] = []
    for result in results:
        metrics = result.metrics or {}
        trial_id = str(metrics.get("trial_id") or Path(result.path).name.removeprefix("trial_"))
        if metrics.get(COMPLETED_KEY):
            status, error = COMPLETED, None
        elif result.error is not None:
            status, error = FAILED, _first_line(result.error)
        else:
            status, error = STOPPED, None
        run = children.get(trial_id)
        if run is not None:
            tags: dict[str, Any] = {"raypeft.trial_status": status}
            if status == FAILED:
                tags.setdefault("raypeft.error", run.data.tags.get("raypeft.error") or error)
                tracking.set_tags(run.info.run_id, tags)
                if run.info.status != "FAILED":
                    tracking.end_run(run.info.run_id, "FAILED")
            elif status == STOPPED:
                tracking.set_tags(run.info.run_id, {**tags, "raypeft.stopped_by": prep.sweep.scheduler.type})
                # Stopping a trial tears down its Train run; the stage may see that as an error and
                # close its run FAILED before the actor dies. The scheduler's stop is what happened.
                if run.info.status != "KILLED":
                    if "raypeft.error" in run.data.tags:
                        client.delete_tag(run.info.run_id, "raypeft.error")
                    tracking.end_run(run.info.run_id, "KILLED")
            else:
                tracking.set_tags(run.info.run_id, tags)
            run = client.get_run(run.info.run_id)
        rows.append(_row(prep, trial_id, result.config or {}, status, error, run, out_dir))
    return rows


def _register_best(prep: PreparedSweep, best: TrialRow, parent: str) -> tuple[str, int]:
    sweep, cfg = prep.sweep, prep.base_cfg
    name = sweep.registry.name or cfg.registered_name(sweep.stage)
    trial_cfg = parse_config(trial_data(prep.base_data, best.params, prep.space.methods, stage=sweep.stage,
                                        output_dir=str(cfg.output_path()), resources=_resources(sweep)))
    tags = {**trial_cfg.adapter.registry_tags(), "stage": sweep.stage, "base_model": cfg.model.name_or_path,
            "workflow": cfg.name, "sweep": sweep.name, "sweep_run_id": parent, "trial_id": best.trial_id,
            "sweep_metric": sweep.metric, sweep.metric: best.metric}
    version = tracking.register_adapter(
        name, f"runs:/{best.run_id}/{tracking.ADAPTER_ARTIFACT}", best.run_id, tags=tags, alias=sweep.registry.alias,
        description=f"best {best.method} adapter of sweep {sweep.name} ({sweep.metric}={best.metric:.4f})")
    return name, version


# ------------------------------------------------------------------------------ driver

def say(message: str) -> None:
    """The default progress line. A module function rather than the builtin ``print`` itself: Tune
    pickles its callbacks (``TrialProgress`` holds this), and Ray Train swaps ``builtins.print``
    at run time, after which the builtin bound at import no longer pickles by reference."""
    print(message)


def run_sweep(prep: PreparedSweep, log: Callable[[str], None] = say) -> SweepOutcome:
    """Run a prepared sweep (``prepare``) and return its rows, best trial and registered version."""
    sweep, cfg = prep.sweep, prep.base_cfg
    started = time.time()
    out_dir = cfg.output_path() / "sweeps" / f"{sweep.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "sweep.yaml").write_text(yaml.safe_dump(sweep.model_dump(mode="json"), sort_keys=False))
    (out_dir / "base_config.yaml").write_text(yaml.safe_dump(prep.base_data, sort_keys=False))
    with tracking.quiet_mlflow():
        experiment_id = tracking.connect(cfg.tracking_uri(), cfg.tracking.experiment, cfg.artifact_location())
        inputs = preflight(cfg, [sweep.stage])[sweep.stage]
        _pin_inputs(cfg, prep.base_data, sweep.stage, inputs)
        launcher.init_ray()
        parent = tracking.start_run(experiment_id, sweep.name, tags={
            SWEEP_TAG: sweep.name, "raypeft.kind": "sweep", "raypeft.stage": sweep.stage,
            "raypeft.base_config": str(prep.base_path), "raypeft.workflow": cfg.name})
        try:
            tracking.log_params(parent, {**tracking.flatten(sweep.model_dump(mode="json"), "sweep."),
                                         "trials": prep.trial_count})
            tracking.log_artifact_file(parent, out_dir / "sweep.yaml")
            tracking.log_artifact_file(parent, out_dir / "base_config.yaml")
            log(f"[raypeft] sweep {sweep.name}: {prep.trial_count} trial(s) of the {sweep.stage} stage "
                f"({sweep.search_alg} search, scheduler {sweep.scheduler.type}), MLflow parent run {parent}")
            ctx = TrialContext(sweep_name=sweep.name, stage=sweep.stage, base_data=prep.base_data, space=prep.space,
                               points=prep.points, trials_dir=str(out_dir / "trials"), experiment_id=experiment_id,
                               parent_run_id=parent, tracking_uri=cfg.tracking_uri(),
                               artifact_location=cfg.artifact_location(), resources=_resources(sweep),
                               metric=sweep.metric)
            progress = TrialProgress(prep, log)
            with _environment():
                results = _tuner(prep, ctx, out_dir, progress).fit()
            if any(r.error is not None or not (r.metrics or {}).get(COMPLETED_KEY) for r in results):
                _release_ended_trials(progress.reaper)
            rows = ranked(_settle_runs(prep, results, parent, experiment_id, out_dir), sweep.mode)
            outcome = _summarise(prep, rows, parent, out_dir, started, log)
        except BaseException:
            tracking.end_run(parent, "FAILED")
            raise
        tracking.end_run(parent, "FINISHED" if outcome.best is not None else "FAILED")
    return outcome


def _summarise(prep: PreparedSweep, rows: list[TrialRow], parent: str, out_dir: Path, started: float,
               log: Callable[[str], None]) -> SweepOutcome:
    sweep = prep.sweep
    memory_label = "GPU MiB" if any("peak_gpu_allocated_mib" in r.metrics for r in rows) else "RSS MiB"
    table = markdown_table(rows, sweep.metric, memory_label)
    (out_dir / "summary.md").write_text(table + "\n")
    write_csv(rows, sweep.metric, out_dir / "summary.csv")
    for name in ("summary.md", "summary.csv"):
        tracking.log_artifact_file(parent, out_dir / name)
    png = plot(rows, sweep.metric, out_dir / "summary.png",
               f"{sweep.name}: {sweep.metric} vs trainable parameters")
    if png is not None:
        tracking.log_artifact_file(parent, png)
    else:
        log("[raypeft] no summary plot (no trial with a finite metric, or matplotlib is not installed)")
    best = next((r for r in rows if r.usable()), None)
    counts = {s: sum(r.status == s for r in rows) for s in (COMPLETED, FAILED, STOPPED)}
    seconds = time.time() - started
    tracking.log_metrics(parent, {"trials_completed": counts[COMPLETED], "trials_failed": counts[FAILED],
                                  "trials_stopped": counts[STOPPED], "sweep_seconds": seconds})
    name = version = None
    if best is not None:
        tracking.log_metrics(parent, {f"best_{sweep.metric}": best.metric})
        tracking.set_tags(parent, {"raypeft.best_trial": best.trial_id, "raypeft.best_run_id": best.run_id,
                                   "raypeft.best_params": json.dumps(best.params)})
        if sweep.registry.enabled:
            name, version = _register_best(prep, best, parent)
            tracking.set_tags(parent, {"raypeft.registered_model": f"{name}/{version}"})
    log(f"[raypeft] sweep {sweep.name}: {len(rows)} trials in {seconds:.0f} s: {counts[COMPLETED]} completed, "
        f"{counts[FAILED]} failed, {counts[STOPPED]} early-stopped")
    log(table)
    for row in rows:
        if row.status == FAILED:
            log(f"[raypeft] trial {row.trial_id} [{describe(row.params)}] failed: {row.error}")
    if best is None:
        log(f"[raypeft] sweep {sweep.name}: no trial finished with a finite {sweep.metric}; nothing registered")
    else:
        where = f", registered as {name} v{version} @{sweep.registry.alias}" if version else ""
        log(f"[raypeft] best: trial {best.trial_id} [{describe(best.params)}] {sweep.metric}={best.metric:.4f}{where}")
    log(f"[raypeft] summary: {out_dir / 'summary.md'} (+ .csv, .png)")
    return SweepOutcome(sweep.name, parent, out_dir, rows, best, name, version, seconds, table)
