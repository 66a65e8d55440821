"""The driver: runs a workflow's stages in order, each in Ray Train, each its own MLflow run.

Order of work, chosen so that a bad input costs nothing: validate everything that can be
checked without training (model, targets, data, adapter inputs, tracking store) before Ray
starts; then one parent MLflow run for the workflow and a child run per stage. A stage's
adapter is copied out of Ray's checkpoint into ``<output_dir>/<name>/<stage>/adapter``, logged as
an artifact and registered as a model version; the next stage starts from it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from pipeline import engine, tracking
from pipeline.checkpoint import ADAPTER_DIR
from pipeline.config import ConfigError, RunConfig
from pipeline.inputs import sft_rows
from pipeline.modeling import check_adapter_targets, load_tokenizer


@dataclass
class StageOutcome:
    stage: str
    run_id: str
    adapter_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    model_version: int | None = None


def _stage_loop(stage: str) -> Callable[[dict], None]:
    if stage == "sft":
        from pipeline.stages.sft import train_loop

        return train_loop
    raise ConfigError(f"stages: unknown stage '{stage}'")


def preflight(cfg: RunConfig) -> str | None:
    """Check model, adapter targets and data on the driver; return the resolved input adapter.

    Raises ``ConfigError`` / ``DataError`` / ``TrackingError`` with one line; nothing is written.
    """
    try:
        load_tokenizer(cfg.model)
    except (OSError, ValueError) as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(f"model.name_or_path: cannot load '{cfg.model.name_or_path}': "
                          f"{str(exc).splitlines()[0]}") from None
    check_adapter_targets(cfg.adapter, cfg.model)
    if "sft" in cfg.stages:
        sft_rows(cfg)
    if cfg.adapter.init_from:
        return str(tracking.resolve_adapter(cfg.adapter.init_from, tracking_uri=cfg.tracking_uri()))
    return None


def _config_dict(cfg: RunConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json", by_alias=True)


def _publish_adapter(result, out_dir: Path) -> Path:
    """Copy the final checkpoint's adapter to ``out_dir`` (temp dir + rename: never half-written)."""
    if result.checkpoint is None:
        raise RuntimeError("the stage finished without reporting a checkpoint")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".adapter-", dir=out_dir.parent))
    with result.checkpoint.as_directory() as ckpt:
        shutil.copytree(Path(ckpt) / ADAPTER_DIR, staging, dirs_exist_ok=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(staging, out_dir)
    return out_dir


def run_stage(cfg: RunConfig, stage: str, *, experiment_id: str, parent_run_id: str,
              init_adapter: str | None) -> StageOutcome:
    uri = cfg.tracking_uri()
    run_id = tracking.start_run(experiment_id, stage, parent_run_id=parent_run_id,
                                tags={"raypeft.stage": stage, "raypeft.workflow": cfg.name})
    try:
        tracking.log_params(run_id, tracking.flatten(_config_dict(cfg)))
        payload = {"config": _config_dict(cfg), "run_id": run_id, "tracking_uri": uri,
                   "init_adapter": init_adapter}
        result = engine.fit(_stage_loop(stage), payload, cfg, run_name=f"{stage}-{run_id}")
        adapter_dir = _publish_adapter(result, cfg.output_path() / stage / "adapter")
        size = tracking.directory_size(adapter_dir)
        tracking.log_metrics(run_id, {"adapter_size_bytes": size}, step=int(result.metrics.get("step", 0)))
        source = tracking.log_adapter(run_id, adapter_dir)
        version = None
        if cfg.tracking.register_adapter:
            a = cfg.adapter
            version = tracking.register_adapter(
                cfg.registered_name(stage), source, run_id,
                tags={**a.registry_tags(), "stage": stage,
                      "base_model": cfg.model.name_or_path, "workflow": cfg.name},
                description=f"{a.method} adapter from the {stage} stage of {cfg.name}",
            )
            tracking.set_tags(run_id, {"raypeft.registered_model": f"{cfg.registered_name(stage)}/{version}"})
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    tracking.end_run(run_id, "FINISHED")
    return StageOutcome(stage, run_id, adapter_dir, dict(result.metrics), version)


def run_workflow(cfg: RunConfig, stages: list[str] | None = None,
                 log: Callable[[str], None] = print) -> list[StageOutcome]:
    """Run ``stages`` (default: the config's) in order and return what each produced."""
    stages = stages or list(cfg.stages)
    with tracking.quiet_mlflow():
        experiment_id = tracking.connect(cfg.tracking_uri(), cfg.tracking.experiment, cfg.artifact_location())
        init_adapter = preflight(cfg)
        out = cfg.output_path()
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(_config_dict(cfg), sort_keys=False))
        engine.init_ray()
        parent = tracking.start_run(experiment_id, cfg.name, tags={"raypeft.workflow": cfg.name,
                                                                    "raypeft.stages": ",".join(stages)})
        outcomes: list[StageOutcome] = []
        try:
            tracking.log_params(parent, tracking.flatten(_config_dict(cfg)))
            tracking.log_artifact_file(parent, out / "config.yaml")
            for stage in stages:
                log(f"[raypeft] stage {stage}: starting (MLflow run under {parent})")
                outcome = run_stage(cfg, stage, experiment_id=experiment_id, parent_run_id=parent,
                                    init_adapter=init_adapter)
                outcomes.append(outcome)
                init_adapter = str(outcome.adapter_dir)
                log(f"[raypeft] stage {stage}: adapter at {outcome.adapter_dir}"
                    + (f", registered as {cfg.registered_name(stage)} v{outcome.model_version}"
                       if outcome.model_version else ""))
        except BaseException:
            tracking.end_run(parent, "FAILED")
            raise
        tracking.end_run(parent, "FINISHED")
    return outcomes
