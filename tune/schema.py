"""The sweep YAML, validated at the boundary like a run config.

A sweep names a run config (``base_config``, relative to the sweep file), the one stage each
trial runs, a search space over dotted config fields, the search algorithm, an optional
early-stopping scheduler, the metric to optimise and the resources of one trial. A bad file
fails on the driver with one line naming the field (``SweepError``), before Ray starts.

Search space entries map a dotted field (anything ``--set`` accepts: ``adapter.r``,
``sft.learning_rate``, ...) to one spec, or to a list of specs with ``when`` conditions
(first match wins), e.g. a learning rate per method::

    sft.learning_rate:
      - {grid: [2.0e-3], when: {adapter.method: [lora]}}
      - {grid: [3.0e-2], when: {adapter.method: [prefix, prompt]}}
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raypeft.pipeline.config import ConfigError, StageName, apply_overrides
from raypeft.pipeline.config.loading import read_yaml_mapping

KINDS = ("grid", "choice", "uniform", "loguniform", "randint")
CONFIG_PREFIX = "config."  # ``--set config.sft.max_steps=5`` edits the base run config, not the sweep


class SweepError(ConfigError):
    """A sweep file problem, one line: ``<field path>: <problem>`` (a ``ConfigError``: exit code 2)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ParamSpec(_Strict):
    """One way to draw a field's value: exactly one kind, optionally only ``when`` others match.

    ``grid``: every value, enumerated (Tune's ``grid_search``); ``choice``: one value drawn at
    random; ``uniform`` / ``loguniform``: ``[low, high]`` floats; ``randint``: ``[low, high)``.
    ``when`` maps other swept (or base config) dotted fields to the values that activate this spec.
    """

    grid: list[Any] | None = None
    choice: list[Any] | None = None
    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    when: dict[str, list[Any]] | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> "ParamSpec":
        given = [k for k in KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            got = " and ".join(given) if given else "none"
            raise ValueError(f"give exactly one of {', '.join(KINDS)}; got {got}")
        kind = given[0]
        values = getattr(self, kind)
        if kind in ("grid", "choice") and not values:
            raise ValueError(f"{kind} needs at least one value")
        if kind in ("uniform", "loguniform", "randint") and not values[0] < values[1]:
            raise ValueError(f"{kind} needs [low, high] with low < high, got {list(values)}")
        if kind == "loguniform" and values[0] <= 0:
            raise ValueError(f"loguniform needs low > 0, got {values[0]}")
        if self.when is not None:
            for key, allowed in self.when.items():
                if not allowed:
                    raise ValueError(f"when.{key} needs at least one value")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) is not None)

    @property
    def values(self) -> Any:
        return getattr(self, self.kind)


class SchedulerSpec(_Strict):
    """Early stopping. ``asha``: asynchronous successive halving on an intermediate metric.

    ``metric`` is read at every intermediate report (the stage's latest logged value, e.g.
    ``train_loss``); ``time_attr`` is the stage's optimiser step, so ``grace_period`` is in steps.
    ``max_t`` (default: unbounded) stops any trial that reaches it.
    """

    type: Literal["none", "asha"] = "none"
    metric: str = "train_loss"
    mode: Literal["min", "max"] = "min"
    time_attr: str = "step"
    grace_period: int = Field(default=10, gt=0)
    reduction_factor: float = Field(default=2.0, gt=1)
    max_t: int | None = Field(default=None, gt=0)


class ResourcesSpec(_Strict):
    """What one trial takes: its Ray Train workers (fractional GPUs allowed) and the Tune actor
    that drives them (it only waits on Ray Train, so it needs no CPU of its own by default)."""

    num_workers: int = Field(default=1, gt=0)
    cpus_per_worker: float = Field(default=1.0, gt=0)
    gpus_per_worker: float = Field(default=0.0, ge=0)
    trial_cpus: float = Field(default=0.0, ge=0)


class RegisterSpec(_Strict):
    """Registration of the best trial's adapter: a new version of ``name`` (default: the base
    config's registered name for the stage, e.g. ``quickstart-sft``) carrying ``alias``."""

    enabled: bool = True
    name: str | None = None
    alias: str = "best"

    @field_validator("alias")
    @classmethod
    def _alias_ok(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", v) or re.fullmatch(r"[vV]\d+", v):
            raise ValueError("must be letters, digits, '_' or '-', not starting with a digit and not 'v<number>'")
        return v


class SweepConfig(_Strict):
    name: str = "sweep"
    base_config: str
    stage: StageName = "sft"
    overrides: list[str] = []
    search_space: dict[str, list[ParamSpec]] = Field(min_length=1)
    search_alg: Literal["grid", "random", "optuna"] = "grid"
    scheduler: SchedulerSpec = SchedulerSpec()
    metric: str = "rougeL_after"
    mode: Literal["min", "max"] = "max"
    num_samples: int = Field(default=1, gt=0)
    max_concurrent_trials: int | None = Field(default=None, gt=0)
    seed: int | None = None
    resources: ResourcesSpec | None = None
    registry: RegisterSpec = RegisterSpec()

    @field_validator("name")
    @classmethod
    def _name_is_safe(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", v):
            raise ValueError("must be letters, digits, '_', '.', '-' (it names runs and folders)")
        return v

    @field_validator("search_space", mode="before")
    @classmethod
    def _specs_as_lists(cls, v: Any) -> Any:
        if isinstance(v, dict):
            return {k: (spec if isinstance(spec, list) else [spec]) for k, spec in v.items()}
        return v

    @field_validator("search_space")
    @classmethod
    def _keys_dotted(cls, v: dict[str, list[ParamSpec]]) -> dict[str, list[ParamSpec]]:
        for key, specs in v.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", key):
                raise ValueError(f"'{key}' is not a dotted config field (e.g. adapter.r)")
            if not specs:
                raise ValueError(f"'{key}' has an empty list of specs")
        return v


# ----------------------------------------------------------------------------- loading

def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _format_error(err: dict, data: dict) -> str:
    loc = list(err["loc"])
    # A single spec is stored as a one-element list: drop that index when the file gave a mapping.
    if len(loc) >= 3 and loc[0] == "search_space" and isinstance(loc[2], int):
        raw = (data.get("search_space") or {}).get(loc[1])
        if isinstance(raw, dict):
            del loc[2]
        else:
            loc[1] = f"{loc[1]}[{loc.pop(2)}]"
    path = ".".join(str(p) for p in loc) or "<root>"
    if err["type"] == "extra_forbidden":
        known = {"<root>": SweepConfig, "scheduler": SchedulerSpec, "resources": ResourcesSpec,
                 "registry": RegisterSpec}
        parent = ".".join(str(p) for p in loc[:-1]) or "<root>"
        model = known.get(parent, ParamSpec if parent.startswith("search_space") else None)
        keys = f"; known keys: {', '.join(model.model_fields)}" if model else ""
        return f"{path}: unknown key{keys}"
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    if err["type"] == "missing":
        return f"{path}: required"
    return f"{path}: {msg[0].lower() + msg[1:]}, got {_describe(err.get('input'))}"


def parse_sweep(data: Any, *, origin: str = "sweep") -> SweepConfig:
    """Validate a plain mapping into a ``SweepConfig`` or raise ``SweepError`` (one line)."""
    if not isinstance(data, dict):
        raise SweepError(f"{origin}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return SweepConfig.model_validate(data)
    except ValidationError as exc:
        raise SweepError(_format_error(exc.errors()[0], data)) from None


def _apply_sweep_override(data: dict, item: str) -> None:
    """``search_space.<dotted key>.<kind>=value`` replaces that key's spec; anything else is a
    plain dotted override of the sweep file (``num_samples=4``, ``scheduler.type=none``)."""
    key, _, raw = item.partition("=")
    head, _, rest = key.strip().partition(".")
    kind = rest.rsplit(".", 1)[-1] if "." in rest else ""
    if head == "search_space" and kind in KINDS:
        param = rest[: -len(kind) - 1]
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as exc:
            raise SweepError(f"--set {item}: value is not valid YAML ({exc.problem})") from None
        space = data.setdefault("search_space", {})
        if not isinstance(space, dict):
            raise SweepError(f"--set {item}: search_space is not a mapping")
        space[param] = {kind: value}
        return
    try:
        apply_overrides(data, [item])
    except ConfigError as exc:
        raise SweepError(str(exc)) from None


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> tuple[SweepConfig, list[str]]:
    """Read a sweep file and apply ``--set`` items.

    Returns the sweep and the ``--set`` items meant for the base run config (``config.<key>=v``,
    prefix removed), which apply after the sweep's own ``overrides``.
    """
    data = read_yaml_mapping(path, kind="sweep", error=SweepError)
    base_items: list[str] = []
    for item in overrides or []:
        if "=" not in item:
            raise SweepError(f"--set {item}: expected dotted.key=value")
        if item.startswith(CONFIG_PREFIX):
            base_items.append(item[len(CONFIG_PREFIX):])
        else:
            _apply_sweep_override(data, item)
    return parse_sweep(data, origin=str(path)), base_items


def base_config_path(sweep: SweepConfig, sweep_file: str | Path) -> Path:
    """``base_config`` is relative to the sweep file's folder (absolute paths are kept)."""
    path = Path(sweep.base_config).expanduser()
    return path if path.is_absolute() else (Path(sweep_file).resolve().parent / path)
