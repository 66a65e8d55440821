"""Each stage's input adapters: which config fields name them and how a name becomes a folder.

An adapter input is written as

* a stage name (``sft``, ``reward``, ``dpo``, ``ppo``): that stage's published adapter in this
  workflow, ``<output_dir>/<name>/<stage>/adapter``. If the stage runs earlier in the same
  invocation the folder appears before it is needed; otherwise (``raypeft run --stage ppo``) it
  must already exist;
* a folder holding ``adapter_config.json``;
* ``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` or ``runs:/RUN/PATH``, downloaded on the driver;
* null: no adapter (a fresh one from the ``adapter`` block, or no reference adapter).

``reference`` fields also take ``policy_init`` (the same input as the policy's start, so the
reference is a frozen copy of it) and ``base`` (every adapter disabled).

Everything is resolved on the driver before Ray starts, so a wrong name fails in one line
naming the field.
"""

from __future__ import annotations

from pathlib import Path

from raypeft.pipeline import tracking
from raypeft.pipeline.config import STAGES, ConfigError, RunConfig
from raypeft.pipeline.roles import VALUE_HEAD_FILE

POLICY_INIT = "policy_init"
BASE = "base"


def stage_fields(cfg: RunConfig, stage: str) -> dict[str, tuple[str, str | None]]:
    """``{input role: (config field path, raw value)}`` of ``stage``; ``reference`` already
    rewritten from ``policy_init`` / ``base`` to the policy's value / None."""
    if stage == "sft":
        return {"init": ("adapter.init_from", cfg.adapter.init_from)}
    if stage == "reward":
        return {"init": ("reward.init_from", cfg.reward.init_from)}
    spec = cfg.dpo if stage == "dpo" else cfg.ppo
    fields = {"policy": (f"{stage}.policy_init", spec.policy_init),
              "reference": (f"{stage}.reference", _reference(spec.reference, spec.policy_init))}
    if stage == "ppo":
        fields["reward"] = ("ppo.reward_adapter", cfg.ppo.reward_adapter)
        fields["critic"] = ("ppo.critic_init", cfg.ppo.critic_init)
    return fields


def _reference(value: str, policy_init: str | None) -> str | None:
    if value == POLICY_INIT:
        return policy_init
    if value == BASE:
        return None
    return value


def resolve(field: str, value: str | None, cfg: RunConfig, stage: str, order: list[str]) -> str | None:
    """One input as a local folder (or None); ``order`` is the stages this invocation runs."""
    if value is None:
        return None
    if value in STAGES:
        if value in order and order.index(value) >= order.index(stage):
            when = "is this stage" if value == stage else f"runs after {stage}"
            raise ConfigError(f"{field}: '{value}' {when} in this workflow; an input must come from an "
                              "earlier stage, a folder or a models:/ URI")
        folder = cfg.stage_adapter_dir(value)
        if value not in order and not (folder / "adapter_config.json").is_file():
            raise ConfigError(f"{field}: no adapter from stage '{value}' at {folder}; run that stage first "
                              f"(add it to the stages) or name a folder or a models:/ URI")
        return str(folder)
    try:
        return str(tracking.resolve_adapter(value, tracking_uri=cfg.tracking_uri()))
    except tracking.TrackingError as exc:
        raise ConfigError(f"{field}: {exc}") from None


def resolve_stage_inputs(cfg: RunConfig, order: list[str]) -> dict[str, dict[str, str | None]]:
    """``{stage: {input role: local folder or None}}`` for every stage in ``order``.

    Also checks what can be checked now: the PPO reward input must carry a value head (when it
    exists already), and the critic may start from a reward-model folder only if it has one too.
    """
    out: dict[str, dict[str, str | None]] = {}
    downloaded: dict[str, str | None] = {}  # one download per registry URI, however many fields name it
    for stage in order:
        resolved: dict[str, str | None] = {}
        for role, (field, value) in stage_fields(cfg, stage).items():
            if value is not None and tracking.is_registry_uri(value):
                if value not in downloaded:
                    downloaded[value] = resolve(field, value, cfg, stage, order)
                resolved[role] = downloaded[value]
            else:
                resolved[role] = resolve(field, value, cfg, stage, order)
        if stage == "ppo":
            reward = resolved["reward"]
            field = "ppo.reward_adapter"
            if reward is None:
                raise ConfigError(f"{field}: the PPO stage needs a reward model (e.g. 'reward')")
            if Path(reward, "adapter_config.json").is_file() and not Path(reward, VALUE_HEAD_FILE).is_file():
                raise ConfigError(f"{field}: {reward} has no {VALUE_HEAD_FILE}, so it is not a reward model "
                                  "(use the output of a reward stage)")
        out[stage] = resolved
    return out
