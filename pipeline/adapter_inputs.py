"""Every stage's input adapters: which config fields name them, how a name becomes a folder, and
whether that folder is safe to hand to the workers and fits the base.

A stage declares its inputs (``Stage.inputs`` in its module, looked up in
``pipeline.stages.registry``); an input is written as

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
naming the field. An existing input is then checked: weights only from safetensors (a pickled
``adapter_model.bin`` needs ``model.allow_pickle_adapters: true`` and is then read with
``torch.load(weights_only=True)`` and converted, so workers only ever read safetensors), the
file whole and every tensor floating point and finite (``pipeline.adapter_files``), and
every tensor's shape against this base model on a weightless skeleton, naming the layer that
does not fit.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from raypeft.adapters import AdapterModel
from raypeft.adapters.serialization import load_adapter_weights, save_adapter_weights
from raypeft.pipeline import tracking
from raypeft.pipeline.adapter_files import check_weights_file
from raypeft.pipeline.config import STAGES, ConfigError, RunConfig
from raypeft.pipeline.modeling import skeleton_model
from raypeft.pipeline.roles import VALUE_HEAD_FILE
from raypeft.pipeline.stages.definition import InputFields
from raypeft.pipeline.stages.registry import stage_named

SAFE_WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"

Inputs = dict[str, dict[str, str | None]]  # {stage: {input role: local folder or None}}


def stage_fields(cfg: RunConfig, stage: str) -> InputFields:
    """``{input role: (config field path, raw value)}`` of ``stage``; ``reference`` already
    rewritten from ``policy_init`` / ``base`` to the policy's value / None."""
    return stage_named(stage).input_fields(cfg)


# ------------------------------------------------------------------------------ resolution

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


def resolve_stage_inputs(cfg: RunConfig, order: list[str]) -> Inputs:
    """``{stage: {input role: local folder or None}}`` for every stage in ``order``.

    Also checks what can be checked now: a reward-model input (``AdapterInput.reward_model``, e.g.
    PPO's reward) must be given and carry a value head when it exists already; a critic may then
    start from it, value head included.
    """
    out: Inputs = {}
    downloaded: dict[str, str | None] = {}  # one download per registry URI, however many fields name it
    for stage in order:
        definition = stage_named(stage)
        fields = definition.input_fields(cfg)
        resolved: dict[str, str | None] = {}
        for role, (field, value) in fields.items():
            if value is not None and tracking.is_registry_uri(value):
                if value not in downloaded:
                    downloaded[value] = resolve(field, value, cfg, stage, order)
                resolved[role] = downloaded[value]
            else:
                resolved[role] = resolve(field, value, cfg, stage, order)
        for declared in definition.inputs:
            if declared.reward_model and not (declared.optional and resolved[declared.role] is None):
                _check_reward_model(fields[declared.role][0], resolved[declared.role], stage)
        out[stage] = resolved
    return out


def _check_reward_model(field: str, folder: str | None, stage: str) -> None:
    if folder is None:
        raise ConfigError(f"{field}: the {stage.upper()} stage needs a reward model (e.g. 'reward')")
    if Path(folder, "adapter_config.json").is_file() and not Path(folder, VALUE_HEAD_FILE).is_file():
        raise ConfigError(f"{field}: {folder} has no {VALUE_HEAD_FILE}, so it is not a reward model "
                          "(use the output of a reward stage)")


# ------------------------------------------------------------------------------ safety and fit

def _from_this_run(value: str | None, order: list[str]) -> bool:
    """A stage-name input that this invocation produces: it does not exist yet (or is replaced)."""
    return value in STAGES and value in order


def safe_adapter_folder(folder: str, field: str, *, allow_pickle: bool) -> str:
    """``folder`` if its weights are safetensors; a converted copy of a pickled one if allowed.

    The pickle is read once, here, with ``torch.load(weights_only=True)`` (which refuses
    anything but tensors and plain containers); the copy holds ``adapter_model.safetensors``
    only, so no worker ever unpickles.
    """
    path = Path(folder)
    if (path / SAFE_WEIGHTS).is_file():
        return folder
    if not (path / PICKLE_WEIGHTS).is_file():
        raise ConfigError(f"{field}: {folder} has no {SAFE_WEIGHTS}")
    if not allow_pickle:
        raise ConfigError(f"{field}: {path / PICKLE_WEIGHTS} is a pickle, and loading a pickle can run code; "
                          f"convert it to {SAFE_WEIGHTS}, or set model.allow_pickle_adapters: true if you "
                          "trust its source")
    try:
        weights = load_adapter_weights(path, allow_pickle=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{field}: {path / PICKLE_WEIGHTS} holds more than tensors, refused even with "
                          f"model.allow_pickle_adapters ({type(exc).__name__}: {first[:200]})") from None
    copy = Path(tempfile.mkdtemp(prefix="raypeft-adapter-"))
    shutil.copytree(path, copy, dirs_exist_ok=True, ignore=shutil.ignore_patterns(PICKLE_WEIGHTS))
    save_adapter_weights(weights, copy)
    return str(copy)


def check_adapter_fits(folder: str, field: str, skeleton_factory: Callable[[], Any]) -> None:
    """Load ``folder`` onto a weightless skeleton of the base: every tensor's shape must match.

    A meta-device load reads the adapter file (small) and compares shapes without allocating
    the base, so an adapter trained on another model fails here naming the layer.
    """
    try:
        AdapterModel.from_pretrained(skeleton_factory(), folder)
    except NotImplementedError:
        return  # a method whose loading needs real weights (not meta tensors): the workers check it
    except (ValueError, KeyError, FileNotFoundError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{field}: {folder} does not fit model.name_or_path: {first}") from None


def check_input_adapters(cfg: RunConfig, inputs: Inputs, order: list[str]) -> Inputs:
    """Every existing input adapter: safetensors (or an allowed, converted pickle) that fits the base.

    Returns ``inputs`` with converted folders substituted. Adapters a stage of this invocation
    will write are skipped: they do not exist yet and are written by raypeft itself.
    """
    done: dict[str, str] = {}
    out: Inputs = {}
    for stage, roles in inputs.items():
        fields = stage_fields(cfg, stage)
        resolved: dict[str, str | None] = {}
        for role, folder in roles.items():
            field, value = fields.get(role, (f"{stage}.{role}", None))
            if folder is None or _from_this_run(value, order):
                resolved[role] = folder
                continue
            if folder not in done:
                safe = safe_adapter_folder(folder, field, allow_pickle=cfg.model.allow_pickle_adapters)
                check_weights_file(safe, field)
                check_adapter_fits(safe, field, lambda: skeleton_model(cfg.model))
                done[folder] = safe
            resolved[role] = done[folder]
        out[stage] = resolved
    return out
