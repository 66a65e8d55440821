"""Reading a run config: strict YAML (a key written twice is an error), ``--set`` overrides,
validation into ``RunConfig`` and pydantic's errors rewritten as one line with the field path.

``read_yaml_mapping`` is the one strict YAML reader: sweep files (``raypeft.tune.schema``) use it too."""

from __future__ import annotations

import difflib
import reprlib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from raypeft.pipeline.config.adapters import ADAPTER_SPECS
from raypeft.pipeline.config.base import ConfigError
from raypeft.pipeline.config.run import RunConfig
from raypeft.pipeline.deepspeed_configs import resolve as resolve_deepspeed
from raypeft.pipeline.text_encoding import utf8_problem

# Bounds on what a config may expand to. A run config is a few hundred values, a sweep file a
# few thousand; YAML aliases let 500 bytes name a billion (the "billion laughs" bomb), and deep
# nesting overflows the parser's recursion. Both are refused while the file is parsed.
MAX_DEPTH = 64
MAX_VALUES = 100_000

# The shown value in an error: bounded whatever the value is (a huge list, an aliased tree).
_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlist, _SHORT.maxdict, _SHORT.maxlevel = 60, 60, 6, 6, 3


def _describe(value: Any) -> str:
    text = _SHORT.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _model_fields_at(model: type[BaseModel], data: Any, path: tuple) -> tuple[type[BaseModel] | None, Any]:
    """Walk the schema along ``path`` so unknown keys can be answered with a did-you-mean."""
    current: Any = model
    node = data
    for key in path:
        if current is None or not isinstance(node, dict):
            return None, None
        if current is RunConfig and key == "adapter":
            method = node.get("adapter", {}).get("method", "lora") if isinstance(node.get("adapter"), dict) else "lora"
            current = ADAPTER_SPECS.get(method)
            node = node.get(key)
            continue
        field = current.model_fields.get(key) if isinstance(current, type) and issubclass(current, BaseModel) else None
        if field is None:
            return None, None
        ann = field.annotation
        current = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        node = node.get(key)
    return current, node


def _format_error(err: dict, data: dict) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in ADAPTER_SPECS and err["loc"][0] == "adapter"))
    path = ".".join(str(p) for p in loc) or "<root>"
    kind = err["type"]
    if kind == "cross_field":  # already "<field path>: <problem>" (RunConfig._adapter_fits_the_run)
        return err["msg"]
    if kind == "extra_forbidden":
        parent, _ = _model_fields_at(RunConfig, data, loc[:-1])
        known = sorted(parent.model_fields) if parent else []
        hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
        tail = f"; did you mean '{hint[0]}'?" if hint else (f"; known keys: {', '.join(known)}" if known else "")
        if loc[0] == "adapter" and parent is not None and not hint:
            method = data.get("adapter", {}).get("method", "lora")
            tail = f"; it is not a field of method '{method}' (fields: {', '.join(known)})"
        return f"{path}: unknown key{tail}"
    if kind == "union_tag_invalid":
        method = (err.get("input") or {}).get("method")
        return f"{path}.method: unknown method {_describe(method)}; expected one of {', '.join(ADAPTER_SPECS)}"
    got = _describe(err.get("input"))
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return f"{path}: {msg[0].lower() + msg[1:]}, got {got}"


def parse_config(data: Any, *, origin: str = "config") -> RunConfig:
    """Validate a plain mapping into a ``RunConfig`` or raise ``ConfigError`` (one line)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{origin}: expected a mapping at the top level, got {type(data).__name__}")
    if data.get("deepspeed") is not None:
        try:  # checked here too, to name the problem without the whole mapping after it
            resolve_deepspeed(data["deepspeed"]) if isinstance(data["deepspeed"], (str, dict)) else None
        except ValueError as exc:
            raise ConfigError(f"deepspeed: {exc}") from None
    adapter = data.get("adapter")
    if isinstance(adapter, dict) and "method" not in adapter:
        data = {**data, "adapter": {"method": "lora", **adapter}}
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        raise ConfigError(_format_error(first, data)) from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``--set a.b.c=value`` overrides; values are parsed as YAML scalars/lists."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected dotted.key=value")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set {item}: empty key segment")
        try:
            value = _load_guarded(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item}: value is not valid YAML ({exc.problem})") from None
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item}: '{part}' is a {type(child).__name__}, not a section")
            node = child
        node[parts[-1]] = value
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a key written twice in one mapping is an error, not "last wins",
    and nesting deeper than ``MAX_DEPTH`` is an error, not a ``RecursionError``."""

    def compose_node(self, parent, index):
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_DEPTH} levels deep",
                                                  self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node, deep=False):
        if any(k.tag == "tag:yaml.org,2002:merge" for k, _ in node.value):
            return super().construct_mapping(node, deep=deep)  # '<<' merges may override on purpose
        seen: dict[Any, Any] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, (str, int, float, bool)) and key in seen:
                first = seen[key]
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}' (first at line {first.line + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many values ``node`` stands for once every alias is expanded (counted once per node:
    an alias is the same node object as its anchor, so this is linear in the file)."""
    known = memo.get(id(node))
    if known is not None:
        return known
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(n, memo) for n in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        size = 1
    memo[id(node)] = min(size, MAX_VALUES + 1)
    return memo[id(node)]


def _load_guarded(text: str) -> Any:
    """``yaml.load`` with the strict loader, refusing a document whose aliases expand past
    ``MAX_VALUES`` before it is built (building it, or showing it in an error, would not end)."""
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}) > MAX_VALUES:
            raise yaml.composer.ComposerError(
                None, None, f"its aliases expand to more than {MAX_VALUES:,} values (an alias bomb?); "
                "write the values out", node.start_mark)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml_mapping(path: str | Path, *, kind: str = "config",
                      error: type[ConfigError] = ConfigError) -> dict[str, Any]:
    """The top-level mapping of a YAML file, read strictly, or ``error`` as one line.

    Every YAML file raypeft reads (run configs, sweep files) goes through here, so they share one
    set of rules: a key written twice in one mapping is an error naming the key and both lines,
    a syntax error names its line and column, and the top level must be a mapping (an empty file
    is ``{}``). ``kind`` names the file in "not found" (``config file not found``).
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {kind} file not found")
    raw = path.read_bytes()
    problem = utf8_problem(raw)
    if problem:
        raise error(f"{path}: {problem}")
    try:
        data = _load_guarded(raw.decode("utf-8")) or {}
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise error(f"{path}: YAML syntax error at {where}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: YAML syntax error: {exc}") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML file, apply ``--set`` overrides and validate."""
    data = read_yaml_mapping(path)
    apply_overrides(data, overrides or [])
    return parse_config(data, origin=str(path))
