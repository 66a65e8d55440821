"""Everything about a run that can be checked without training, checked on the driver before Ray
starts: ``raypeft validate``, and the first thing ``raypeft run`` and ``raypeft sweep`` do.

Each stage says what to check through its definition (``pipeline.stages.registry``): whether it
needs a causal LM, its data (``Stage.check_data``), its batch shape (against a DeepSpeed config)
and its input adapters (``pipeline.adapter_inputs``). The checks themselves are in
``pipeline.preflight_checks``.
"""

from __future__ import annotations

from raypeft.pipeline import ray_cluster, tracking
from raypeft.pipeline.adapter_inputs import Inputs, check_input_adapters, resolve_stage_inputs
from raypeft.pipeline.backends import fill_deepspeed_config
from raypeft.pipeline.config import ConfigError, RunConfig
from raypeft.pipeline.modeling import check_adapter_targets, load_tokenizer
from raypeft.pipeline.preflight_checks import (Warn, check_adapter_size, model_load_error, probe_tracking,
                                              quiet_progress, warn_stderr)
from raypeft.pipeline.stages.registry import stage_batch, stage_named
from raypeft.pipeline.writable import folder_problem


def ordered_stages(cfg: RunConfig, stages: list[str] | None) -> list[str]:
    """The stages to run, in the config's order (``--stage`` may name them in any order)."""
    if not stages:
        return list(cfg.stages)
    unknown = [s for s in stages if s not in cfg.stages]
    if unknown:
        raise ConfigError(f"--stage {unknown[0]}: not a stage of this config (stages: {', '.join(cfg.stages)})")
    return [s for s in cfg.stages if s in stages]


def preflight(cfg: RunConfig, stages: list[str] | None = None, warn: Warn = warn_stderr) -> Inputs:
    """Check the Ray cluster (it answers; a local one can hold the workers), model, adapter targets
    and size, data, row lengths and batch sizes against the worker count, the output folder, the
    tracking store and adapter inputs on the driver, in that order (the tracking store is touched
    only once everything local is fine).

    Returns every stage's input adapters as local folders (``pipeline.adapter_inputs``; a pickled
    adapter the YAML allows comes back as a converted safetensors copy). Raises ``ConfigError`` /
    ``DataError`` / ``TrackingError`` with one line; nothing is written. ``warn`` gets warnings
    such as the count of truncated rows.
    """
    with tracking.quiet_mlflow(), quiet_progress():
        return _preflight(cfg, ordered_stages(cfg, stages), warn)


def _preflight(cfg: RunConfig, stages: list[str], warn: Warn) -> Inputs:
    causal = [s for s in stages if stage_named(s).causal_lm_only]
    if causal and cfg.model.task_type != "CAUSAL_LM":
        raise ConfigError(f"stages: the {causal[0]} stage needs a causal LM (model.task_type: CAUSAL_LM), "
                          f"got {cfg.model.task_type}")
    ray_cluster.check_ray(cfg)  # the workers fit (and a cluster answers) before the rows are counted for them
    try:
        tokenizer = load_tokenizer(cfg.model)
        trainable = check_adapter_targets(cfg.adapter, cfg.model)
    except ConfigError:
        raise
    except (OSError, ValueError) as exc:
        raise ConfigError(model_load_error(cfg.model, exc)) from None
    check_adapter_size(cfg.adapter, trainable)
    for stage in stages:  # every row source each stage reads, and the rows' lengths
        stage_named(stage).check_data(cfg, tokenizer, warn)
    _check_deepspeed(cfg, stages)
    problem = folder_problem(cfg.output_path())
    if problem:
        raise ConfigError(f"output_dir: {problem}")
    probe_tracking(cfg.tracking_uri(), field=cfg.tracking_uri_field())
    return check_input_adapters(cfg, resolve_stage_inputs(cfg, stages), stages)


def _check_deepspeed(cfg: RunConfig, stages: list[str]) -> None:
    """A DeepSpeed config whose batch fields contradict a stage's batch fails here, not in every worker."""
    ds = cfg.deepspeed_config()
    if ds is None:
        return
    for stage in stages:
        micro, accum = stage_batch(cfg, stage)
        try:
            fill_deepspeed_config(ds, micro_batch_size=micro, grad_accum=accum, world_size=cfg.scaling.num_workers,
                                  max_grad_norm=getattr(cfg, stage).max_grad_norm, dtype=cfg.model.dtype)
        except ValueError as exc:
            raise ConfigError(f"{exc} in stage {stage}") from None
        ds = cfg.deepspeed_config()  # fresh for the next stage: filling writes into it
