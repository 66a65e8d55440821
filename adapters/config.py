"""Adapter configuration: the base dataclass, task types and the ``peft_type`` registry.

Configs are stored as ``adapter_config.json`` using PEFT's field names, so an adapter trained here
can be loaded by ``peft`` and vice versa. Every adapter method (LoRA, prompt tuning, P-tuning,
prefix tuning) subclasses :class:`AdapterConfig` and registers itself with :func:`register_config`,
which is how :func:`load_config` knows which class a folder's ``peft_type`` needs.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from torch import nn

from .constraints import FieldRule, check_fields
from .layer import AdapterLayer
from .targeting import find_targets
from .task_types import TaskType

__all__ = [
    "CLASSIFIER_HEAD_NAMES", "CONFIG_NAME", "AdapterConfig", "TaskType", "config_class_for", "load_config",
    "read_config_dict", "register_config", "registered_peft_types",
]

CONFIG_NAME = "adapter_config.json"

_C = TypeVar("_C", bound="AdapterConfig")


# Heads that PEFT trains in full (modules_to_save) for classification tasks; kept identical so that
# an adapter saved by either library contains the same modules.
CLASSIFIER_HEAD_NAMES: tuple[str, ...] = ("classifier", "score")

_CONFIG_REGISTRY: dict[str, type[AdapterConfig]] = {}


def register_config(cls: type[_C]) -> type[_C]:
    """Class decorator: make ``cls`` the config class for its ``PEFT_TYPE`` in :func:`load_config`.

    New adapter methods plug in here instead of editing a central ``if/elif`` chain.
    """
    peft_type = getattr(cls, "PEFT_TYPE", "")
    if not peft_type:
        raise TypeError(f"{cls.__name__} must define a non-empty PEFT_TYPE class attribute")
    _CONFIG_REGISTRY[peft_type] = cls
    return cls


def config_class_for(peft_type: str) -> type[AdapterConfig]:
    """Return the registered config class for ``peft_type`` (e.g. ``"LORA"``)."""
    try:
        return _CONFIG_REGISTRY[str(peft_type).upper()]
    except KeyError:
        known = ", ".join(sorted(_CONFIG_REGISTRY)) or "none"
        raise ValueError(f"unsupported peft_type {peft_type!r}; supported: {known}") from None


def registered_peft_types() -> list[str]:
    """The ``peft_type`` values this library can load."""
    return sorted(_CONFIG_REGISTRY)


@dataclass
class AdapterConfig:
    """Fields shared by every adapter method, named as in PEFT's ``adapter_config.json``.

    Subclasses set ``PEFT_TYPE`` and implement the layer factory hooks (:meth:`create_layer`,
    :meth:`update_layer`) that the injection code calls; that is the extension point for new
    weight-space methods.
    """

    PEFT_TYPE: ClassVar[str] = ""
    # Prefix of the trainable adapter parameters inside a wrapped layer (e.g. "lora_").
    ADAPTER_PREFIX: ClassVar[str] = ""
    # Rules over several fields (single-field constraints are declared with ``param``).
    FIELD_RULES: ClassVar[tuple[FieldRule, ...]] = ()

    peft_type: str | None = None
    task_type: str | None = None
    base_model_name_or_path: str | None = None
    revision: str | None = None
    inference_mode: bool = False
    auto_mapping: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.PEFT_TYPE:
            if self.peft_type is not None and str(self.peft_type).upper() != self.PEFT_TYPE:
                raise ValueError(
                    f"{type(self).__name__} has peft_type {self.PEFT_TYPE!r}, got {self.peft_type!r}"
                )
            self.peft_type = self.PEFT_TYPE
        if self.task_type is not None and self.task_type not in TaskType.ALL:
            raise ValueError(
                f"invalid task_type {self.task_type!r}; expected one of {', '.join(TaskType.ALL)}"
            )
        check_fields(self)

    # ------------------------------------------------------------------ serialization
    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (sets become sorted lists) using PEFT's key names."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, (set, frozenset)):
                value = sorted(value)
            elif isinstance(value, (list, tuple)):
                value = list(value)
            elif isinstance(value, dict):
                value = dict(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls: type[_C], data: dict[str, Any]) -> _C:
        """Build a config from a dict, ignoring keys this class does not know.

        PEFT writes many keys we do not implement (``peft_version``, ``lora_bias``, ...); dropping
        them keeps its configs loadable. Loading a config whose unknown keys *change behaviour*
        (e.g. ``lora_bias: true``) is refused by the subclass's ``_check_unsupported``.
        """
        if cls is AdapterConfig or not cls.PEFT_TYPE:
            peft_type = data.get("peft_type")
            if peft_type is None:
                raise ValueError("config dict has no 'peft_type'; cannot pick a config class")
            cls = config_class_for(peft_type)  # type: ignore[assignment]
        cls._check_unsupported(data)
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        kwargs = {k: v for k, v in data.items() if k in known}
        return cls(**kwargs)

    @classmethod
    def _check_unsupported(cls, data: dict[str, Any]) -> None:
        """Hook for subclasses: raise if ``data`` asks for a feature this library lacks."""

    def save_pretrained(self, save_directory: str | os.PathLike[str]) -> str:
        """Write ``adapter_config.json`` into ``save_directory`` (created if needed); return its path."""
        save_directory = os.fspath(save_directory)
        if os.path.isfile(save_directory):
            raise ValueError(f"save_directory {save_directory!r} is a file, expected a folder")
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as fh:
            json.dump(self.to_dict(), fh, indent=2, sort_keys=True)
            fh.write("\n")
        return path

    @classmethod
    def from_pretrained(cls: type[_C], directory: str | os.PathLike[str]) -> _C:
        """Read ``adapter_config.json`` from ``directory``."""
        data = read_config_dict(directory)
        if cls is not AdapterConfig and cls.PEFT_TYPE:
            saved = str(data.get("peft_type", cls.PEFT_TYPE)).upper()
            if saved != cls.PEFT_TYPE:
                raise ValueError(
                    f"{os.fspath(directory)!r} holds a {saved} adapter, not {cls.PEFT_TYPE}"
                )
        return cls.from_dict(data)

    def copy(self: _C, **changes: Any) -> _C:
        """A deep-enough copy with ``changes`` applied (configs hold lists/dicts that must not alias)."""
        data = self.to_dict()
        data.update(changes)
        return type(self).from_dict(data)

    # ------------------------------------------------------------------ method hooks
    def find_target_modules(self, model: nn.Module) -> list[str]:
        """Full names of the modules this adapter wraps in ``model``.

        PEFT's ``target_modules`` rules (see :mod:`adapters.targeting`) unless a method picks its
        modules another way (per-architecture defaults, the top layers only, ...).
        """
        return find_targets(model, self)

    def create_layer(self, target: nn.Module, adapter_name: str, module_name: str) -> AdapterLayer:
        """Wrap ``target`` in this method's adapter layer holding one adapter ``adapter_name``.

        Raise ``TypeError`` for module types the method does not support.
        """
        raise NotImplementedError(f"{type(self).__name__} is not a weight-space adapter method")

    def update_layer(self, layer: AdapterLayer, adapter_name: str, module_name: str) -> None:
        """Add adapter ``adapter_name`` to an existing wrapper of this method."""
        raise NotImplementedError(f"{type(self).__name__} is not a weight-space adapter method")

    def layer_class(self) -> type[AdapterLayer]:
        """The base class of this method's wrappers (to recognise already wrapped modules)."""
        raise NotImplementedError(f"{type(self).__name__} is not a weight-space adapter method")


def read_config_dict(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the parsed ``adapter_config.json`` of ``directory`` with a clear error when absent."""
    directory = os.fspath(directory)
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"adapter folder {directory!r} does not exist")
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{directory!r} is not an adapter folder: it has no {CONFIG_NAME}"
        )
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, dict):
        raise ValueError(f"{path!r} does not hold a JSON object")
    return data


def load_config(directory: str | os.PathLike[str]) -> AdapterConfig:
    """Load ``adapter_config.json`` from ``directory`` as the class registered for its ``peft_type``."""
    data = read_config_dict(directory)
    if "peft_type" not in data:
        raise ValueError(f"{os.fspath(directory)!r}: {CONFIG_NAME} has no 'peft_type'")
    return config_class_for(data["peft_type"]).from_dict(data)
