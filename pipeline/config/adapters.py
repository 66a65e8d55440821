"""The ``adapter`` section: one spec per adapter method, derived from the library's method registry.

Nothing about a method's fields is declared here. Each spec is built from its registry line
(:data:`raypeft.adapters.METHODS`): the fields a user sets, with the config class's types,
defaults and constraints (``param(8, gt=0)`` becomes ``Field(8, gt=0)``, ``choices`` a
``Literal``, a ``check`` or a ``FieldRule`` a validator with the same words), so a YAML block
reads like the config class it becomes and fails with the same reasons, as one line with its
field path (``adapter.r: input should be greater than 0, got 0``).

What is added here is the pipeline's own: ``method`` and ``init_from``, multitask prompt
tuning's fixed ``task_id``, made-absolute paths (Ray workers run in other folders) and AdaLoRA's
shrinking rank budget (the library leaves that to its rank allocator).
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import AfterValidator, Field, ValidationInfo, create_model, field_validator
from pydantic_core import PydanticUndefined

from raypeft.adapters import METHODS, AdapterMethod
from raypeft.adapters.constraints import Constraint, FieldRule, constraint_of
from raypeft.pipeline.config.base import StrictModel


class _AdapterSpecBase(StrictModel):
    """Fields every adapter method shares; the rest of a spec maps one-to-one to its config class."""

    METHOD: ClassVar[AdapterMethod]
    # keys that stay in the pipeline (everything else goes to the library config)
    PIPELINE_KEYS: ClassVar[frozenset[str]] = frozenset({"method", "init_from"})

    init_from: str | None = None

    def adapter_kwargs(self) -> dict[str, Any]:
        """Fields that belong to the adapter config (everything but pipeline-only keys)."""
        return self.model_dump(exclude=set(self.PIPELINE_KEYS))

    def registry_tags(self) -> dict[str, Any]:
        """The hyperparameters that identify this adapter in the registry and in sweeps."""
        return self.METHOD.registry_tags(self.model_dump())


class _AdaLoraExtras(_AdapterSpecBase):
    """The pipeline refuses a growing rank budget up front (the library's allocator would, later)."""

    @field_validator("target_r", check_fields=False)
    @classmethod
    def _target_below_init(cls, v: int, info: ValidationInfo) -> int:
        init_r = info.data.get("init_r")
        if init_r is not None and v > init_r:
            raise ValueError(f"must not exceed adapter.init_r ({init_r}): the rank budget only shrinks")
        return v


class _MultitaskExtras(_AdapterSpecBase):
    """Each row's task comes from ``data.columns.task_id`` or, when that is unset, is the fixed
    ``task_id`` (default 0). Source inits read a safetensors checkpoint."""

    PIPELINE_KEYS: ClassVar[frozenset[str]] = frozenset({"method", "init_from", "task_id"})

    task_id: int | None = Field(default=None, ge=0)

    @field_validator("prompt_tuning_init_state_dict_path", check_fields=False)
    @classmethod
    def _absolute(cls, v: str | None) -> str | None:
        """Made absolute on the driver: Ray workers run in other folders."""
        return None if v is None else str(Path(v).expanduser().resolve())


# pipeline-only additions, by method (a method without any needs no entry)
_EXTRAS: dict[str, type[_AdapterSpecBase]] = {"adalora": _AdaLoraExtras, "multitask_prompt": _MultitaskExtras}


def _without_none(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if not args or len(args) == len(typing.get_args(annotation)):
        return annotation
    return args[0] if len(args) == 1 else Union[tuple(args)]  # noqa: UP007 - built from a tuple


def _refuse(problem: str) -> None:
    raise ValueError(problem)


def _value_check(constraint: Constraint) -> AfterValidator | None:
    """The constraint's non-numeric rules (blank text, custom checks) as a pydantic validator."""
    if not (constraint.nonblank or constraint.check):
        return None

    def check(value: Any) -> Any:
        if value is None:
            return value
        if constraint.nonblank and isinstance(value, str) and not value.strip():
            _refuse("must not be blank")
        problem = constraint.check(value) if constraint.check else None
        if problem:
            _refuse(problem)
        return value

    return AfterValidator(check)


def _spec_field(field: dataclasses.Field, annotation: Any, user_defaults: dict[str, Any]) -> tuple[Any, Any]:
    """``(annotation, FieldInfo)`` of one config field as a YAML key."""
    constraint = constraint_of(field) or Constraint()
    if field.name in user_defaults:
        default = user_defaults[field.name]
    elif field.default is not dataclasses.MISSING:
        default = field.default
    else:
        default = field.default_factory()  # type: ignore[misc]
    if constraint.choices is not None:
        annotation = Literal[constraint.choices]  # type: ignore[valid-type]
    if constraint.required and default is None:  # no usable default: the YAML block must set it
        default = PydanticUndefined
    if constraint.required or (field.name in user_defaults and default is not None):
        annotation = _without_none(annotation)
    check = _value_check(constraint)
    if check is not None:
        annotation = Annotated[annotation, check]
    bounds = {k: v for k, v in (("gt", constraint.gt), ("ge", constraint.ge), ("lt", constraint.lt)) if v is not None}
    return annotation, Field(default=default, **bounds)


def _rule_validator(rule: FieldRule) -> Any:
    """A config class's ``FieldRule`` as a field validator naming the other fields ``adapter.<name>``."""

    def check(cls: type, v: Any, info: ValidationInfo) -> Any:
        problem = rule.problem({**info.data, rule.field: v}, lambda name: f"adapter.{name}")
        if problem:
            _refuse(problem)
        return v

    return field_validator(rule.field)(classmethod(check))  # type: ignore[arg-type]


def _canonical(name: str) -> Any:
    def canonical(cls: type, v: str) -> str:
        return name

    return field_validator("method")(classmethod(canonical))  # type: ignore[arg-type]


def _build_spec(method: AdapterMethod) -> type[_AdapterSpecBase]:
    """The pydantic model of one method's YAML block, derived from its registry line."""
    config_class = method.config_class
    hints = typing.get_type_hints(config_class)
    by_name = {f.name: f for f in dataclasses.fields(config_class)}
    user_defaults = dict(method.user_defaults)
    fields: dict[str, Any] = {"method": (Literal[method.names], method.name)}  # type: ignore[valid-type]
    for name in method.user_fields:
        fields[name] = _spec_field(by_name[name], hints[name], user_defaults)
    validators = {f"_rule_{rule.field}": _rule_validator(rule) for rule in config_class.FIELD_RULES
                  if rule.field in method.user_fields}
    if method.aliases:
        validators["_canonical_method"] = _canonical(method.name)
    spec = create_model(  # type: ignore[call-overload]
        config_class.__name__.removesuffix("Config") + "Spec",
        __base__=_EXTRAS.get(method.name, _AdapterSpecBase),
        __module__=__name__,
        __doc__=f"``adapter.method: {method.name}``: the YAML face of ``{config_class.__name__}``.",
        __validators__=validators,
        **fields,
    )
    spec.METHOD = method
    return spec


_SPECS: tuple[type[_AdapterSpecBase], ...] = tuple(_build_spec(m) for m in METHODS)
# importable by their class names (pickling refers to them that way)
globals().update({spec.__name__: spec for spec in _SPECS})

ADAPTER_SPECS: dict[str, type[_AdapterSpecBase]] = {
    name: spec for spec in _SPECS for name in spec.METHOD.names
}
AdapterSpec = Annotated[Union[_SPECS], Field(discriminator="method")]  # noqa: UP007 - built from a tuple

# The names the rest of the pipeline and its tests use.
LoraSpec = ADAPTER_SPECS["lora"]
PromptSpec = ADAPTER_SPECS["prompt"]
PrefixSpec = ADAPTER_SPECS["prefix"]
PTuningSpec = ADAPTER_SPECS["ptuning"]
IA3Spec = ADAPTER_SPECS["ia3"]
LoHaSpec = ADAPTER_SPECS["loha"]
LoKrSpec = ADAPTER_SPECS["lokr"]
AdaLoraSpec = ADAPTER_SPECS["adalora"]
BottleneckSpec = ADAPTER_SPECS["bottleneck"]
AdaptionPromptSpec = ADAPTER_SPECS["adaption_prompt"]
MultitaskPromptSpec = ADAPTER_SPECS["multitask_prompt"]

# Stages that feed multitask prompt tuning its task ids (the others build batches without them).
TASK_ID_STAGES = ("sft",)
