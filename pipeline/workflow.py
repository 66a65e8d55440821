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

A workflow holds its output folder's lock while it runs and records its progress there
(``pipeline.resume``), so the same command after Ctrl-C or a killed driver skips the stages
that finished and continues the interrupted one from its last checkpoint in its own MLflow run.
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
from raypeft.pipeline import deepspeed_configs, launcher, resume, tracking
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
    # This driver holds the output folder's lock, so any staging or old copy here was left by a
    # driver that died part-way through a publish.
    for leftover in [*out_dir.parent.glob(".adapter-*"), *out_dir.parent.glob(f".{out_dir.name}-old-*")]:
        shutil.rmtree(leftover, ignore_errors=True)
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
              tags: dict[str, str] | None = None, callbacks: list | None = None,
              resume_run_id: str | None = None, on_start: Callable[[str], None] | None = None) -> StageOutcome:
    """Run one stage as a child MLflow run; ``inputs`` are its resolved input adapters.

    ``run_name`` / ``tags`` name and tag the child run, ``callbacks`` go to Ray Train (a sweep
    trial passes its own, to forward reports to Ray Tune). ``resume_run_id``: continue that run
    (a stage a killed driver left running) from Ray Train's last checkpoint. ``on_start`` gets the
    run id as soon as it exists. Ctrl-C ends the run KILLED, any other failure FAILED.
    """
    uri = cfg.tracking_uri()
    if resume_run_id is not None:
        run_id = resume_run_id
        tracking.reopen_run(run_id)
    else:
        run_id = tracking.start_run(experiment_id, run_name or stage, parent_run_id=parent_run_id,
                                    tags={"raypeft.stage": stage, "raypeft.workflow": cfg.name,
                                          "raypeft.driver": resume.this_driver(), **(tags or {})})
    if on_start is not None:
        on_start(run_id)
    try:
        # Workers get the DeepSpeed config itself, not a name or a path their node may lack;
        # its ZeRO stage and offload devices become params and tags of the stage run.
        ds = cfg.deepspeed_config()
        resolved = _config_dict(cfg.model_copy(update={"deepspeed": ds}))
        tracking.log_params(run_id, tracking.flatten(resolved))
        tracking.set_tags(run_id, {f"raypeft.input.{role}": path or "none" for role, path in inputs.items()})
        tracking.set_tags(run_id, {f"raypeft.{k}": v for k, v in deepspeed_configs.summary(ds).items()})
        tracking.set_tags(run_id, {"raypeft.driver": resume.this_driver()})
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
    except KeyboardInterrupt:
        tracking.end_run(run_id, "KILLED")
        raise
    except BaseException:
        tracking.end_run(run_id, "FAILED")
        raise
    tracking.end_run(run_id, "FINISHED")
    return StageOutcome(stage, run_id, adapter_dir, dict(result.metrics), version)


def _close_stale_runs(experiment_id: str, cfg: RunConfig, keep: set[str], log: Callable[[str], None]) -> None:
    """End KILLED the runs of this workflow that a driver now gone left RUNNING (those a resume
    continues, ``keep``, are reopened instead)."""
    for run_id, driver in tracking.stale_runs(experiment_id, cfg.name):
        if run_id not in keep and not resume.driver_alive(driver):
            tracking.end_run(run_id, "KILLED")
            log(f"[raypeft] closed MLflow run {run_id} as KILLED: its driver ({driver}) is gone")


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_workflow(cfg: RunConfig, stages: list[str] | None = None,
                 log: Callable[[str], None] = print, fresh: bool = False) -> list[StageOutcome]:
    """Run ``stages`` (default: the config's; always in the config's order) and return what each produced.

    Rerunning the same command after a crash or Ctrl-C resumes (``pipeline.resume``): finished
    stages whose adapters are unchanged are skipped, the interrupted one continues from its last
    checkpoint in its own MLflow run; ``fresh`` starts over. One driver per output folder.
    """
    stages = ordered_stages(cfg, stages)
    with tracking.quiet_mlflow():
        inputs = preflight(cfg, stages)  # before the tracking store or any folder is written to
        out = cfg.output_path()
        with resume.output_lock(out):
            return _run_locked(cfg, stages, inputs, out, log, fresh)


def _run_locked(cfg: RunConfig, stages: list[str], inputs: dict, out: Path, log: Callable[[str], None],
                fresh: bool) -> list[StageOutcome]:
    experiment_id = tracking.connect(cfg.tracking_uri(), cfg.tracking.experiment, cfg.artifact_location())
    fingerprint = resume.config_fingerprint(_config_dict(cfg))
    previous = None if fresh else resume.resumable(resume.load(out), fingerprint)
    keep = set() if previous is None else {previous.parent_run_id} | {r.run_id for r in previous.stages.values()}
    _close_stale_runs(experiment_id, cfg, keep, log)
    (out / "config.yaml").write_text(yaml.safe_dump(_config_dict(cfg), sort_keys=False))
    launcher.init_ray()
    if previous is not None:
        parent = previous.parent_run_id
        tracking.reopen_run(parent)
        log(f"[raypeft] resuming the workflow of MLflow run {parent}, which stopped part-way "
            "(--fresh starts over)")
    else:
        parent = tracking.start_run(experiment_id, cfg.name, tags={"raypeft.workflow": cfg.name,
                                                                    "raypeft.stages": ",".join(stages),
                                                                    "raypeft.driver": resume.this_driver()})
    state = resume.WorkflowState(fingerprint, parent, resume.this_driver(),
                                 stages=dict(previous.stages) if previous else {})
    resume.save(out, state)
    outcomes: list[StageOutcome] = []
    try:
        tracking.set_tags(parent, {"raypeft.driver": resume.this_driver()})
        tracking.log_params(parent, tracking.flatten(_config_dict(cfg)))
        tracking.log_artifact_file(parent, out / "config.yaml")
        for stage in stages:
            adapter_dir = cfg.stage_adapter_dir(stage)
            done = resume.finished_record(previous, stage, adapter_dir)
            if done is not None:
                log(f"[raypeft] stage {stage}: finished in an earlier attempt (MLflow run {done.run_id}), its "
                    f"config and adapter unchanged; skipped (--fresh reruns it)")
                outcomes.append(StageOutcome(stage, done.run_id, adapter_dir, dict(done.metrics), done.model_version))
                continue
            again = resume.interrupted_run(previous, stage)
            if again is not None:
                log(f"[raypeft] stage {stage}: resuming MLflow run {again} from its last checkpoint")
            else:
                log(f"[raypeft] stage {stage}: starting (MLflow run under {parent})")

            def started(run_id: str, stage: str = stage) -> None:
                state.stages[stage] = resume.StageRecord(resume.RUNNING, run_id)
                resume.save(out, state)

            outcome = run_stage(cfg, stage, experiment_id=experiment_id, parent_run_id=parent,
                                inputs=inputs[stage], resume_run_id=again, on_start=started)
            state.stages[stage] = resume.StageRecord(resume.FINISHED, outcome.run_id,
                                                     resume.adapter_fingerprint(outcome.adapter_dir),
                                                     outcome.model_version, _numbers(outcome.metrics))
            resume.save(out, state)
            outcomes.append(outcome)
            log(f"[raypeft] stage {stage}: adapter at {outcome.adapter_dir}"
                + (f", registered as {cfg.registered_name(stage)} v{outcome.model_version}"
                   if outcome.model_version else ""))
    except KeyboardInterrupt:
        tracking.end_run(parent, "KILLED")  # the state stays "running": the same command resumes
        raise
    except BaseException:
        tracking.end_run(parent, "FAILED")
        state.status = resume.FAILED
        resume.save(out, state)
        raise
    tracking.end_run(parent, "FINISHED")
    state.status = resume.FINISHED
    resume.save(out, state)
    return outcomes
