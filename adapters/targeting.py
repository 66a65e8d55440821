"""Which modules an adapter config targets.

Rules (PEFT-compatible):

* ``target_modules`` list: ``name == t or name.endswith("." + t)`` for each entry ``t``;
* ``target_modules`` string: ``re.fullmatch`` against the full module name;
* ``"all-linear"``: every ``nn.Linear``/``Conv1D`` except the model's output head;
* ``layers_to_transform`` / ``layers_pattern`` keep only modules in the given layer indices;
* modules listed in ``modules_to_save`` (and their children) and ``exclude_modules`` are skipped.

Modules already wrapped by an adapter are treated as a unit (never descended into), so adding a
second adapter targets the same wrappers, not the ``lora_A``/``lora_B`` inside them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from torch import nn
from transformers.pytorch_utils import Conv1D

from .layer import AdapterLayer
from .modules_to_save import ModulesToSaveWrapper
from .task_types import TaskType

ALL_LINEAR = "all-linear"


class TargetingFields(Protocol):
    """What the targeting rules read from an adapter config (any method's config has these or
    leaves them out: the optional ones are read with ``getattr``)."""

    task_type: str | None

# Targets used when a config leaves target_modules unset (PEFT's defaults for these model types).
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi3": ["qkv_proj"],
    "opt": ["q_proj", "v_proj"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "bloom": ["query_key_value"],
    "t5": ["q", "v"],
    "mt5": ["q", "v"],
    "bart": ["q_proj", "v_proj"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
}

_WRAPPERS = (AdapterLayer, ModulesToSaveWrapper)


def iter_modules(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """Like ``named_modules`` (without the root) but yields adapter wrappers without their insides."""
    for child_name, child in model.named_children():
        name = f"{prefix}.{child_name}" if prefix else child_name
        yield name, child
        if not isinstance(child, _WRAPPERS):
            yield from iter_modules(child, name)


def unwrap(module: nn.Module) -> nn.Module:
    """The original module behind a wrapper (or the module itself)."""
    while isinstance(module, _WRAPPERS):
        module = module.base_layer if isinstance(module, AdapterLayer) else module.original_module
    return module


def suffix_match(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target)


def is_linear(module: nn.Module) -> bool:
    base = unwrap(module)
    return isinstance(base, nn.Linear) or isinstance(base, Conv1D)


def available_names(model: nn.Module) -> list[str]:
    """Distinct last components of the leaf modules that own parameters (for error messages)."""
    seen: dict[str, None] = {}
    for name, module in iter_modules(model):
        leaf = isinstance(module, _WRAPPERS) or not any(True for _ in module.children())
        if leaf and any(True for _ in unwrap(module).parameters(recurse=False)):
            seen.setdefault(name.rsplit(".", 1)[-1], None)
    return list(seen)


def output_head_names(model: nn.Module, task_type: str | None) -> set[str]:
    """Names of the module(s) ``all-linear`` must leave alone: the LM head or classifier head."""
    heads: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out = None
    if callable(get_out):
        try:
            out = get_out()
        except (NotImplementedError, AttributeError):
            out = None
    if out is not None:
        heads.update(n for n, m in iter_modules(model) if m is out or unwrap(m) is out)
    elif task_type == TaskType.SEQ_CLS:
        for head in ("score", "classifier"):
            if isinstance(getattr(model, head, None), nn.Module):
                heads.add(head)
                break
    if not heads and isinstance(getattr(model, "lm_head", None), nn.Module):
        heads.add("lm_head")
    return heads


def layer_index(name: str, layers_pattern: Sequence[str] | str | None) -> int | None:
    """Index of the (first) numbered block a module sits in, e.g. 3 for ``model.layers.3.mlp.up``."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else list(layers_pattern or [])
    if not patterns:
        match = re.match(r"(?:^|.*?\.)[^.]+\.(\d+)\.", name)
        return int(match.group(1)) if match else None
    for pattern in patterns:
        match = re.match(rf"(?:^|.*?\.){pattern}\.(\d+)\.", name)
        if match:
            return int(match.group(1))
    return None


def _in_modules(name: str, module_names: Sequence[str]) -> bool:
    """``name`` is one of ``module_names`` (by suffix) or lies inside one of them."""
    return any(re.match(rf"(^|.*\.){re.escape(m)}($|\..*)", name) for m in module_names)


def _excluded(name: str, exclude: list[str] | str | None) -> bool:
    if not exclude:
        return False
    if isinstance(exclude, str):
        return re.fullmatch(exclude, name) is not None
    return any(suffix_match(name, e) for e in exclude)


def resolve_target_modules(model: nn.Module, config: TargetingFields) -> list[str] | str:
    """``config.target_modules`` or the default for the model type when it is unset."""
    targets: Any = getattr(config, "target_modules", None)
    if targets:
        return targets
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type in DEFAULT_TARGET_MODULES:
        return list(DEFAULT_TARGET_MODULES[model_type])
    raise ValueError(
        f"target_modules is not set and there is no default for model_type {model_type!r}; "
        f"available: {', '.join(available_names(model))}"
    )


def find_targets(model: nn.Module, config: TargetingFields) -> list[str]:
    """Full names of the modules ``config`` adapts, in model order.

    Raises ``ValueError`` when a ``target_modules`` entry (or the regex) matches no module,
    naming the modules that exist, so a typo fails at setup rather than training nothing.
    """
    targets = resolve_target_modules(model, config)
    modules = list(iter_modules(model))
    names = [n for n, _ in modules]
    modules_to_save = list(getattr(config, "modules_to_save", None) or [])
    exclude = getattr(config, "exclude_modules", None)
    layers = getattr(config, "layers_to_transform", None)
    layers_pattern = getattr(config, "layers_pattern", None)

    def fail(what: str) -> ValueError:
        return ValueError(
            f"target_modules: no module matches {what}; available: {', '.join(available_names(model))}"
        )

    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        heads = output_head_names(model, config.task_type)
        selected = [n for n, m in modules if is_linear(m) and n not in heads]
        if not selected:
            raise fail(repr(ALL_LINEAR))
    elif isinstance(targets, str):
        pattern = re.compile(targets)
        selected = [n for n in names if pattern.fullmatch(n)]
        if not selected:
            raise fail(repr(targets))
    else:
        wanted = list(targets)
        for t in wanted:
            if not any(suffix_match(n, t) for n in names):
                raise fail(repr(t))
        selected = [n for n in names if any(suffix_match(n, t) for t in wanted)]
        if layers is not None and layers != []:
            keep = {layers} if isinstance(layers, int) else set(layers)
            selected = [n for n in selected if layer_index(n, layers_pattern) in keep]

    selected = [n for n in selected if not _in_modules(n, modules_to_save) and not _excluded(n, exclude)]
    if not selected:
        raise ValueError(
            "target_modules: every matching module was removed by layers_to_transform, exclude_modules "
            f"or modules_to_save; available: {', '.join(available_names(model))}"
        )
    return selected


def find_modules_to_save(model: nn.Module, module_names: Sequence[str]) -> list[str]:
    """Full names of the modules matching ``modules_to_save`` entries (suffix match).

    Entries that match nothing are skipped: PEFT adds both ``classifier`` and ``score`` for
    classification tasks and a model has only one of them. Nested matches keep the outermost.
    """
    found: list[str] = []
    for name, _ in iter_modules(model):
        if any(suffix_match(name, m) for m in module_names):
            if not any(name.startswith(f + ".") for f in found):
                found.append(name)
    return found
