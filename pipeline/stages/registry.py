"""The stages, by name: where the workflow, preflight, input-adapter resolution, sweeps and the CLI
look a stage up (its loop, inputs, batch shape, data checks, summary metrics).

A stage is defined once, as ``STAGE`` at the end of its own module (``pipeline.stages.definition``);
its name is a ``StageSection`` field of ``RunConfig`` (``pipeline.config.run.STAGES``). This module
lists the definitions (the one line a new stage adds below) and checks, when it is imported,
that they and the config's sections name exactly the same stages.
"""

from __future__ import annotations

from typing import Iterable

from raypeft.pipeline.config import STAGES, ConfigError, RunConfig
from raypeft.pipeline.stages import dpo, grpo, ppo, reward, sft
from raypeft.pipeline.stages.definition import Stage

DEFINED: tuple[Stage, ...] = (
    sft.STAGE,
    reward.STAGE,
    dpo.STAGE,
    ppo.STAGE,
    grpo.STAGE,
)


def build_registry(defined: Iterable[Stage], run_config: type[RunConfig] = RunConfig,
                   sections: tuple[str, ...] = STAGES) -> dict[str, Stage]:
    """``{name: stage}`` in the order of ``sections``; raises ``TypeError`` naming what is missing:
    a section without a definition, a definition without a section, a definition whose section
    class is not its ``RunConfig`` field's, or an input field that is not in the config."""
    by_name: dict[str, Stage] = {}
    for stage in defined:
        if stage.name in by_name:
            raise TypeError(f"stage '{stage.name}' is defined twice")
        by_name[stage.name] = stage
    missing = [name for name in sections if name not in by_name]
    if missing:
        raise TypeError(f"stage section '{missing[0]}' of RunConfig has no stage definition: add its "
                        "module's STAGE to pipeline.stages.registry.DEFINED")
    extra = [name for name in by_name if name not in sections]
    if extra:
        raise TypeError(f"stage '{extra[0]}' has no config section: add a StageSection field "
                        f"'{extra[0]}' to RunConfig")
    defaults = run_config()
    for name in sections:
        stage = by_name[name]
        annotation = run_config.model_fields[name].annotation
        if stage.section is not annotation:
            raise TypeError(f"stage '{name}': its section is {stage.section.__name__}, but RunConfig.{name} "
                            f"is {getattr(annotation, '__name__', annotation)}")
        for declared in stage.inputs:
            try:
                declared.raw(defaults)
            except AttributeError:
                raise TypeError(f"stage '{name}': input '{declared.role}' names '{declared.field}', "
                                "which is not a config field") from None
    return {name: by_name[name] for name in sections}


REGISTRY: dict[str, Stage] = build_registry(DEFINED)


def stage_named(name: str) -> Stage:
    """The definition of stage ``name``; an unknown name is a config error, never another stage's."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"stages: unknown stage '{name}'") from None


def stage_batch(cfg: RunConfig, name: str) -> tuple[int, int]:
    """``(micro-batch rows per worker, micro-batches per optimiser step)`` of stage ``name``: what
    DeepSpeed's batch fields must agree with (checked on the driver before Ray starts)."""
    return stage_named(name).batch(cfg)
