"""One trial: the base run config with the trial's values, run as one pipeline stage.

``run_trial`` is the Tune function trainable. It acts only as the driver of one Ray Train run
(``pipeline.workflow.run_stage``: a child MLflow run under the sweep's parent, the stage's
``TorchTrainer``, the adapter published and logged), so it needs no CPU of its own. What it
reports to Tune at the end is the child run's logged metrics, plus where the adapter is.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.tune
from mlflow import MlflowClient

from raypeft.pipeline import tracking
from raypeft.pipeline.adapter_inputs import resolve_stage_inputs
from raypeft.pipeline.config import RunConfig, parse_config
from raypeft.pipeline.workflow import run_stage
from raypeft.tune.callbacks import TRIAL_TAG, StageReportsToTune
from raypeft.tune.schema import SweepError
from raypeft.tune.space import METHOD_KEY, SearchSpace, describe

COMPLETED_KEY = "raypeft_trial_completed"  # only a trial that published its adapter reports it
SWEEP_TAG = "raypeft.sweep"
PARAMS_TAG = "raypeft.trial_params"


@dataclass
class TrialContext:
    """Everything a trial actor needs, decided on the driver (absolute paths, pinned inputs)."""

    sweep_name: str
    stage: str
    base_data: dict[str, Any]
    space: SearchSpace
    points: list[dict[str, Any]]
    trials_dir: str
    experiment_id: str
    parent_run_id: str
    tracking_uri: str
    artifact_location: str
    resources: dict[str, float] | None
    metric: str


def set_dotted(data: dict, key: str, value: Any) -> None:
    """``data[a][b][c] = value`` for ``key="a.b.c"``, creating sections as ``--set`` does."""
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise SweepError(f"search_space.{key}: '{part}' is a {type(child).__name__}, not a section")
        node = child
    node[parts[-1]] = value


def trial_data(base: dict[str, Any], params: dict[str, Any], methods: dict[str, frozenset[str]], *,
               stage: str, output_dir: str, resources: dict[str, float] | None) -> dict[str, Any]:
    """The run config (plain data) of one trial.

    A trial that switches method keeps only the base adapter fields the new method has (a LoRA
    block's ``r`` would be an unknown key for prompt tuning). Each trial writes under its own
    ``output_dir`` and registers nothing: the sweep registers its best adapter at the end.
    """
    data = copy.deepcopy(base)
    adapter = dict(data.get("adapter") or {})
    method = params.get(METHOD_KEY)
    if method is not None and method != adapter.get("method", "lora"):
        adapter = {k: v for k, v in adapter.items() if k in methods[method]}
    data["adapter"] = adapter
    for key, value in params.items():
        set_dotted(data, key, value)
    data["stages"] = [stage]
    data["output_dir"] = output_dir
    track = {k: v for k, v in dict(data.get("tracking") or {}).items() if k != "register_adapter"}
    track["register"] = False
    data["tracking"] = track
    if resources is not None:
        per_worker = {"CPU": resources["cpus_per_worker"]}
        if resources["gpus_per_worker"] > 0:
            per_worker["GPU"] = resources["gpus_per_worker"]
        data["scaling"] = {"num_workers": resources["num_workers"], "use_gpu": resources["gpus_per_worker"] > 0,
                           "resources_per_worker": per_worker}
    return data


def trial_config(ctx: TrialContext, params: dict[str, Any], trial_id: str) -> RunConfig:
    data = trial_data(ctx.base_data, params, ctx.space.methods, stage=ctx.stage,
                      output_dir=str(Path(ctx.trials_dir) / trial_id), resources=ctx.resources)
    return parse_config(data, origin=f"trial {trial_id}")


def _fail_run(run_id: str, message: str) -> None:
    tracking.set_tags(run_id, {"raypeft.error": message[:5000]})
    tracking.end_run(run_id, "FAILED")


def run_trial(config: dict[str, Any], ctx: TrialContext) -> None:
    """The Tune trainable: resolve the trial's values, run the stage, report its metrics."""
    trial_id = ray.tune.get_context().get_trial_id()
    params = ctx.space.resolve(config, ctx.points)
    cfg = trial_config(ctx, params, trial_id)
    with tracking.quiet_mlflow():
        tracking.connect(ctx.tracking_uri, cfg.tracking.experiment, ctx.artifact_location)
        inputs = resolve_stage_inputs(cfg, [ctx.stage])[ctx.stage]
        tags = {SWEEP_TAG: ctx.sweep_name, TRIAL_TAG: trial_id, PARAMS_TAG: json.dumps(params)}
        outcome = run_stage(cfg, ctx.stage, experiment_id=ctx.experiment_id, parent_run_id=ctx.parent_run_id,
                            inputs=inputs, run_name=f"{trial_id} {describe(params)}", tags=tags,
                            callbacks=[StageReportsToTune(ctx.tracking_uri, ctx.experiment_id, trial_id)])
        logged = dict(MlflowClient().get_run(outcome.run_id).data.metrics)
        # A diverged run trains to the end on NaN weights unless the stage stops it: it is a
        # failed trial, not a candidate for the best adapter.
        diverged = [k for k in ("train_loss", ctx.metric) if k in logged and not math.isfinite(logged[k])]
        if diverged:
            message = (f"{diverged[0]} is {logged[diverged[0]]} after training: the run diverged "
                       f"(lower the learning rate)")
            _fail_run(outcome.run_id, message)
            raise FloatingPointError(f"trial {trial_id}: {message}")
        if ctx.metric not in logged:
            message = (f"metric: the {ctx.stage} stage logged no '{ctx.metric}'; it logged "
                       f"{', '.join(sorted(k for k in logged if '/rank' not in k))}")
            _fail_run(outcome.run_id, message)
            raise SweepError(message)
    final: dict[str, Any] = {k: v for k, v in logged.items() if "/rank" not in k}
    final.update({COMPLETED_KEY: 1, "mlflow_run_id": outcome.run_id, "adapter_dir": str(outcome.adapter_dir)})
    ray.tune.report(final)
