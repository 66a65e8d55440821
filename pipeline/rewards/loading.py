"""Turning the YAML's reward sources into callables, with one-line ``ConfigError``s on the driver.

A source is ``module:function`` (an importable module), ``path/to/file.py:function`` (a file,
relative paths against ``base_dir``, default the working directory) or the bare name of a
built-in (``rouge_l``, ``exact_match``, ``format_check``). ``check_reward_functions`` loads them
all once before Ray starts, so a typo fails in preflight; workers load again from the same
strings (a function defined in a file is not importable by name on another process, so pass
the sources, never the callables, and resolve ``base_dir`` to an absolute path on the driver).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import inspect
import math
import reprlib
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Mapping, Protocol, Sequence

from raypeft.pipeline.config.base import ConfigError
from raypeft.pipeline.rewards.builtin import BUILTIN_REWARDS

# Keywords every reward function is called with (besides the row's columns).
CALL_KEYWORDS = ("prompts", "completions")
TOTAL = "total"  # the metrics label of the weighted sum


class RewardSourceSpec(Protocol):
    """What a config entry for one reward function provides (``RewardSource`` or a config model)."""

    function: str
    weight: float
    name: str | None
    kwargs: Mapping[str, Any]


@dataclass(frozen=True)
class RewardSource:
    """One reward function as the YAML names it: the source, its weight, a metrics label, options."""

    function: str
    weight: float = 1.0
    name: str | None = None  # the label in the metrics; default: the function's own name
    kwargs: Mapping[str, Any] = field(default_factory=dict)  # fixed keyword options, e.g. reference_column


@dataclass(frozen=True)
class RewardFunction:
    """A loaded reward function and how to call it."""

    name: str
    source: str
    weight: float
    fn: Callable[..., Any]
    kwargs: Mapping[str, Any]
    parameters: frozenset[str] | None  # the keywords it takes; None: it takes **kwargs (everything)
    required: frozenset[str]  # keywords without a default: the call must provide them

    def call_keywords(self, available: Mapping[str, Any]) -> dict[str, Any]:
        """The subset of ``available`` this function takes, plus its fixed options."""
        chosen = dict(available) if self.parameters is None else {k: v for k, v in available.items()
                                                                      if k in self.parameters}
        chosen.update(self.kwargs)
        return chosen


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``: an error from user code, fit for a one-line report."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def _module_from_file(path: Path, where: str) -> ModuleType:
    if not path.is_file():
        raise ConfigError(f"{where}: file '{path}' does not exist")
    # One module per file path: loading twice reuses it, two files with the same stem do not clash.
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
    module_name = f"_raypeft_reward_{path.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{where}: '{path}' cannot be loaded as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise ConfigError(f"{where}: loading '{path}' failed: {one_line(exc)}") from exc
    return module


def _module_by_name(name: str, where: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if missing and (name == missing or name.startswith(missing + ".")):
            raise ConfigError(f"{where}: no module named '{name}' (a module on the Python path, or "
                              "path/to/file.py:function)") from exc
        raise ConfigError(f"{where}: importing '{name}' failed: {one_line(exc)}") from exc
    except Exception as exc:
        raise ConfigError(f"{where}: importing '{name}' failed: {one_line(exc)}") from exc


def load_reward_function(source: str, where: str, base_dir: str | Path | None = None) -> Callable[..., Any]:
    """The callable ``source`` names; ``where`` is the field path its errors start with."""
    source = source.strip()
    if ":" not in source:
        if source in BUILTIN_REWARDS:
            return BUILTIN_REWARDS[source]
        hint = difflib.get_close_matches(source, BUILTIN_REWARDS, n=1)
        tail = f"; did you mean '{hint[0]}'?" if hint else f"; built-ins: {', '.join(BUILTIN_REWARDS)}"
        raise ConfigError(f"{where}: '{source}' is neither 'module:function', 'path/to/file.py:function' "
                          f"nor a built-in reward{tail}")
    target, _, attr = source.rpartition(":")
    if not target or not attr.isidentifier():
        raise ConfigError(f"{where}: expected 'module:function' or 'path/to/file.py:function', got '{source}'")
    if target.endswith(".py") or "/" in target or "\\" in target:
        path = Path(target).expanduser()
        if not path.is_absolute():
            path = Path(base_dir or Path.cwd()) / path
        module = _module_from_file(path.resolve(), where)
        shown = str(path)
    else:
        module = _module_by_name(target, where)
        shown = target
    fn = getattr(module, attr, None)
    if fn is None:
        names = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        hint = difflib.get_close_matches(attr, names, n=1)
        raise ConfigError(f"{where}: '{shown}' has no function '{attr}'"
                          + (f"; did you mean '{hint[0]}'?" if hint else ""))
    if not callable(fn):
        raise ConfigError(f"{where}: '{shown}:{attr}' is not callable (it is {reprlib.repr(fn)})")
    return fn


def _signature(fn: Callable[..., Any], where: str,
               kwargs: Mapping[str, Any]) -> tuple[frozenset[str] | None, frozenset[str]]:
    """The keywords ``fn`` takes (None: any) and those it requires, checked against the fixed options.

    ``where`` is the entry's path (``grpo.rewards[0]``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}.function: cannot read the signature of {fn!r}: {one_line(exc)}") from exc
    keyword_kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params)
    names = frozenset(p.name for p in params if p.kind in keyword_kinds)
    required = frozenset(p.name for p in params if p.kind in keyword_kinds and p.default is inspect.Parameter.empty)
    positional_only = [p.name for p in params if p.kind is inspect.Parameter.POSITIONAL_ONLY and p.default is p.empty]
    if positional_only:
        raise ConfigError(f"{where}.function: reward functions are called with keywords only; "
                          f"'{positional_only[0]}' is positional-only")
    if not takes_any and "completions" not in names:
        raise ConfigError(f"{where}.function: a reward function must take a 'completions' keyword (and may take "
                          "'prompts', the row's columns by name, or **kwargs)")
    for key in kwargs:
        if not takes_any and key not in names:
            raise ConfigError(f"{where}.kwargs.{key}: the function takes no argument '{key}'")
    return (None if takes_any else names), required - set(kwargs)


def load_reward_functions(specs: Sequence[RewardSourceSpec], field_path: str,
                          base_dir: str | Path | None = None) -> list[RewardFunction]:
    """Load every source of ``specs`` (the list at ``field_path`` in the YAML), checking weights and labels."""
    if not specs:
        raise ConfigError(f"{field_path}: needs at least one reward function")
    loaded: list[RewardFunction] = []
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        where = f"{field_path}[{i}]"
        weight = float(spec.weight)
        if not math.isfinite(weight):
            raise ConfigError(f"{where}.weight: must be a finite number, got {spec.weight!r}")
        kwargs = dict(spec.kwargs or {})
        fn = load_reward_function(spec.function, f"{where}.function", base_dir)
        parameters, required = _signature(fn, where, kwargs)
        name = spec.name or getattr(fn, "__name__", spec.function)
        if name == TOTAL:
            raise ConfigError(f"{where}.name: '{TOTAL}' is the weighted sum's label; give the function another name")
        if name in seen:
            raise ConfigError(f"{where}.name: '{name}' already labels {field_path}[{seen[name]}]; "
                              "set a distinct name for the metrics")
        seen[name] = i
        loaded.append(RewardFunction(name=name, source=spec.function, weight=weight, fn=fn, kwargs=kwargs,
                                     parameters=parameters, required=required))
    return loaded


def check_reward_functions(specs: Sequence[RewardSourceSpec], field_path: str,
                           base_dir: str | Path | None = None) -> None:
    """Preflight on the driver: every source loads and can be called as the stage will call it."""
    load_reward_functions(specs, field_path, base_dir)
