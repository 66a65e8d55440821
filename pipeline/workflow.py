"""The driver: runs a workflow's stages in order, each in Ray Train, each its own MLflow run.

Order of work, chosen so that a bad input costs nothing: validate everything that can be
checked without training (model, targets, data, adapter inputs, tracking store; see
``pipeline.preflight``) before Ray starts; then one parent MLflow run for the workflow and a child
run per stage, whose loop is the one its definition names (``pipeline.stages.registry``). A
stage's adapter is copied out of Ray's checkpoint into ``<output_dir>/<name>/<stage>/adapter``,
logged as an artifact and registered as a model version. Later stages name their inputs in the
YAML (``reward.init_from: sft``, ``ppo.reward_adapter: reward``, ...; see
``pipeline.adapter_inputs``), so a stage name resolves to that folder whether the stage ran just
now or in an earlier run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from raypeft.adapters import method_for_peft_type
from raypeft.pipeline import deepspeed_configs, launcher, tracking
from raypeft.pipeline.checkpoint import ADAPTER_DIR
from raypeft.pipeline.config import RunConfig
from raypeft.pipeline.preflight import ordered_stages, preflight
from raypeft.pipeline.stages.registry import stage_named


@dataclass
class StageOutcome:
    stage: str
    run_id: str
    adapter_dir: Path
    metrics: dict[str, Any] = field(default_factory=dict)
    model_version: int | None = None


def _registry_tags(cfg: RunConfig, adapter_dir: Path) -> dict[str, Any]:
    """Method and size tags of the adapter a stage published, read from its own config file: a
    later stage may continue an adapter that was not made from this YAML's ``adapter`` block.
    The method comes from the file's ``peft_type`` through the adapter-method registry."""
    try:
        saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    except (OSError, ValueError):
        saved = None
    method = method_for_peft_type(str(saved.get("peft_type", ""))) if isinstance(saved, dict) else None
    if method is None:
        return dict(cfg.adapter.registry_tags())
    return method.registry_tags(saved)


def _config_dict(cfg: RunConfig) -> dict[str, Any]:
    return cfg.model_dump(mode="json", by_alias=True)


def _publish_adapter(result, out_dir: Path) -> Path:
    """Copy the final checkpoint's adapter to ``out_dir`` (temp dir + rename: never half-written)."""
    if result.checkpoint is None:
        raise RuntimeError("the stage finished without reporting a checkpoint")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".adapter-", dir=out_dir.parent))
    try:
        with result.checkpoint.as_directory() as ckpt:
            shutil.copytree(Path(ckpt) / ADAPTER_DIR, staging, dirs_exist_ok=True)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # a failed copy leaves the previous adapter as it was
        raise
    if out_dir.exists():
        # Renames only: at every instant out_dir is the old adapter, absent, or the new one.
        old = out_dir.with_name(f".{out_dir.name}-old-{os.getpid()}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out_dir, old)
        os.replace(staging, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out_dir)
    return out_dir


def run_stage(cfg: RunConfig, stage: str, *, experiment_id: str, parent_run_id: str,
              inputs: dict[str, str | None], run_name: str | None = None,
              tags: dict[str, str] | None = None, callbacks: list | None = None) -> StageOutcome:
    """Run one stage as a child MLflow run; ``inputs`` are its resolved input adapters.

    ``run_name`` / ``tags`` name and tag the child run, ``callbacks`` go to Ray Train (a sweep
    trial passes its own, to forward reports to Ray Tune).
    """
    uri = cfg.tracking_uri()
    run_id = tracking.start_run(experiment_id, run_name or stage, parent_run_id=parent_run_id,
                                tags={"raypeft.stage": stage, "raypeft.workflow": cfg.name, **(tags or {})})
    try:
        # Workers get the DeepSpeed config itself, not a name or a path their node may lack;
        # its ZeRO stage and offload devices become params and tags of the stage run.
        ds = cfg.deepspeed_config()
        resolved = _config_dict(cfg.model_copy(update={"deepspeed": ds}))
        tracking.log_params(run_id, tracking.flatten(resolved))
        tracking.set_tags(run_id, {f"raypeft.input.{role}": path or "none" for role, path in inputs.items()})
        tracking.set_tags(run_id, {f"raypeft.{k}": v for k, v in deepspeed_configs.summary(ds).items()})
        if isinstance(cfg.deepspeed, str):
            tracking.set_tags(run_id, {"raypeft.deepspeed_config": cfg.deepspeed})
        payload = {"config": resolved, "run_id": run_id, "tracking_uri": uri,
                   "init_adapter": inputs.get("init"), "inputs": inputs}
        result = launcher.fit(stage_named(stage).train_loop, payload, cfg, run_name=f"{stage}-{run_id}",
                              callbacks=callbacks)
        adapter_dir = _publish_adapter(result, cfg.stage_adapter_dir(stage))
        size = tracking.directory_size(adapter_dir)
        tracking.log_metrics(run_id, {"adapter_size_bytes": size}, step=int(result.metrics.get("step", 0)))
        source = tracking.log_adapter(run_id, adapter_dir)
        version = None
        if cfg.tracking.register_adapter:
            tags = _registry_tags(cfg, adapter_dir)
            version = tracking.register_adapter(
                cfg.registered_name(stage), source, run_id,
                tags={**tags, "stage": stage, "base_model": cfg.model.name_or_path, "workflow": cfg.name},
                description=f"{tags['method']} adapter from the {stage} stage of {cfg.name}",
            )
            tracking.set_tags(run_id, {"raypeft.registered_model": f"{cfg.registered_name(stage)}/{version}"})
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    tracking.end_run(run_id, "FINISHED")
    return StageOutcome(stage, run_id, adapter_dir, dict(result.metrics), version)


def run_workflow(cfg: RunConfig, stages: list[str] | None = None,
                 log: Callable[[str], None] = print) -> list[StageOutcome]:
    """Run ``stages`` (default: the config's; always in the config's order) and return what each produced."""
    stages = ordered_stages(cfg, stages)
    with tracking.quiet_mlflow():
        inputs = preflight(cfg, stages)  # before the tracking store or any folder is written to
        experiment_id = tracking.connect(cfg.tracking_uri(), cfg.tracking.experiment, cfg.artifact_location())
        out = cfg.output_path()
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(_config_dict(cfg), sort_keys=False))
        launcher.init_ray()
        parent = tracking.start_run(experiment_id, cfg.name, tags={"raypeft.workflow": cfg.name,
                                                                    "raypeft.stages": ",".join(stages)})
        outcomes: list[StageOutcome] = []
        try:
            tracking.log_params(parent, tracking.flatten(_config_dict(cfg)))
            tracking.log_artifact_file(parent, out / "config.yaml")
            for stage in stages:
                log(f"[raypeft] stage {stage}: starting (MLflow run under {parent})")
                outcome = run_stage(cfg, stage, experiment_id=experiment_id, parent_run_id=parent,
                                    inputs=inputs[stage])
                outcomes.append(outcome)
                log(f"[raypeft] stage {stage}: adapter at {outcome.adapter_dir}"
                    + (f", registered as {cfg.registered_name(stage)} v{outcome.model_version}"
                       if outcome.model_version else ""))
        except BaseException:
            tracking.end_run(parent, "FAILED")
            raise
        tracking.end_run(parent, "FINISHED")
    return outcomes
