"""Field constraints declared once, on the config dataclasses, and read by every layer that checks them.

A config field says what values it takes next to its default (``r: int = param(8, gt=0)``). The
library checks them when a config is built (:func:`check_fields`, one-line ``ValueError`` naming
the class and the field); the pipeline derives its YAML schema from the same declarations, so a
bound or a choice is never written twice. No pydantic here: ``adapters`` stays usable alone.

* ``gt``/``ge``/``lt``: numeric bounds (``None`` passes unless ``required``);
* ``choices``: the allowed values;
* ``required``: ``None`` is refused (a YAML block must set the field);
* ``nonblank``: a string that is not only whitespace;
* ``check``: any other single-value rule, returning the problem in words or ``None``.

Rules that read several fields are :class:`FieldRule` entries of a config's ``FIELD_RULES``; they
name the other fields through ``ref`` so each layer can spell them its own way (``init_r`` in the
library, ``adapter.init_r`` in a YAML error).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

_KEY = "raypeft_constraint"


@dataclass(frozen=True)
class Constraint:
    """What one config field accepts (see the module docstring)."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = None
    required: bool = False
    nonblank: bool = False
    check: Callable[[Any], str | None] | None = None

    def problem(self, value: Any, integer: bool) -> str | None:
        """Why ``value`` is refused, in the library's words (``None``: accepted)."""
        if value is None:
            return self._expected(integer) if self.required else None
        if self.choices is not None and value not in self.choices:
            return f"must be one of {self.choices}"
        if self.gt is not None or self.ge is not None or self.lt is not None:
            if integer:
                if isinstance(value, bool) or not isinstance(value, int):
                    return self._expected(integer)
            else:
                try:
                    value = float(value)
                except (TypeError, ValueError):
                    return self._expected(integer)
            if (self.gt is not None and not value > self.gt) or (self.ge is not None and not value >= self.ge) or (
                self.lt is not None and not value < self.lt
            ):
                return self._expected(integer)
        if self.nonblank and isinstance(value, str) and not value.strip():
            return "must not be blank"
        if self.check is not None:
            return self.check(value)
        return None

    def _expected(self, integer: bool) -> str:
        if integer and self.gt == 0 and self.lt is None:
            return "must be a positive integer"
        if integer and self.ge == 0 and self.lt is None:
            return "must be a non-negative integer"
        if self.lt is not None:
            low = f"[{_num(self.ge)}" if self.ge is not None else f"({_num(self.gt)}"
            return f"must be in {low}, {_num(self.lt)})"
        if self.gt == 0:
            return "must be positive"
        if self.ge is not None:
            return f"must be >= {_num(self.ge)}"
        if self.gt is not None:
            return f"must be > {_num(self.gt)}"
        return "must be set"


def _num(x: float | None) -> str:
    return str(int(x)) if x is not None and float(x).is_integer() else str(x)


@dataclass(frozen=True)
class FieldRule:
    """A rule over several fields, reported on ``field``: ``check(values, ref)`` returns the problem
    (naming other fields as ``ref(name)``) or ``None``; it is skipped while a value it reads is unset."""

    field: str
    reads: tuple[str, ...]
    check: Callable[[Mapping[str, Any], Callable[[str], str]], str | None]

    def problem(self, values: Mapping[str, Any], ref: Callable[[str], str]) -> str | None:
        if any(values.get(name) is None for name in (self.field, *self.reads)):
            return None
        return self.check(values, ref)


def param(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING, **constraint: Any) -> Any:
    """A dataclass field with its :class:`Constraint` (``param(8, gt=0)``)."""
    metadata = {_KEY: Constraint(**constraint)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def constraint_of(field: dataclasses.Field) -> Constraint | None:
    """The constraint declared on a dataclass field (``None`` when it has none)."""
    return field.metadata.get(_KEY)


def is_integer_field(field: dataclasses.Field) -> bool:
    """``int`` or ``int | None`` (annotations are strings under ``from __future__ import annotations``)."""
    annotation = field.type if isinstance(field.type, str) else getattr(field.type, "__name__", str(field.type))
    return "int" in [part.strip() for part in annotation.split("|")]


def check_fields(config: Any) -> None:
    """Raise ``ValueError("<Class>: <field> <problem>, got <value>")`` for the first declared
    constraint or field rule ``config`` breaks."""
    owner = type(config).__name__
    for field in dataclasses.fields(config):
        constraint = constraint_of(field)
        if constraint is None:
            continue
        value = getattr(config, field.name)
        problem = constraint.problem(value, is_integer_field(field))
        if problem:
            raise ValueError(f"{owner}: {field.name} {problem}, got {value!r}")
    values = {field.name: getattr(config, field.name) for field in dataclasses.fields(config)}
    for rule in getattr(config, "FIELD_RULES", ()):
        problem = rule.problem(values, lambda name: name)
        if problem:
            raise ValueError(f"{owner}: {rule.field}: {problem}, got {values[rule.field]!r}")
