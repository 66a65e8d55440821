"""Put adapters into a model, choose what trains, and take them out again.

The config supplies the layer factory (``create_layer``/``update_layer``), so this module is
method-agnostic: LoRA today, other weight-space methods later.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .config import CLASSIFIER_HEAD_NAMES, AdapterConfig, TaskType
from .layer import AdapterLayer
from .modules_to_save import ModulesToSaveWrapper
from .targeting import find_modules_to_save, iter_modules

_CLASSIFICATION_TASKS = (TaskType.SEQ_CLS, TaskType.TOKEN_CLS)


def _set_child(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def adapter_layers(root: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    """Every adapter layer with its name relative to ``root``."""
    for name, module in iter_modules(root):
        if isinstance(module, AdapterLayer):
            yield name, module


def save_wrappers(root: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    """Every modules_to_save wrapper with its name relative to ``root``."""
    for name, module in iter_modules(root):
        if isinstance(module, ModulesToSaveWrapper):
            yield name, module


def add_classifier_heads(config: AdapterConfig) -> None:
    """Classification tasks train their head in full, as PEFT does (and records in the config)."""
    if config.task_type in _CLASSIFICATION_TASKS and hasattr(config, "modules_to_save"):
        current: list[str] = list(getattr(config, "modules_to_save") or [])
        for head in CLASSIFIER_HEAD_NAMES:
            if head not in current:
                current.append(head)
        setattr(config, "modules_to_save", current)


def inject_adapter(root: nn.Module, config: AdapterConfig, adapter_name: str) -> list[str]:
    """Wrap (or extend) every module ``config`` targets with adapter ``adapter_name``.

    Returns the names of the adapted modules. The new adapter starts inactive and frozen; the
    caller activates it with :func:`set_active_adapter`.
    """
    if any(adapter_name in layer.adapter_names for _, layer in adapter_layers(root)):
        raise ValueError(f"adapter {adapter_name!r} already exists in the model")
    add_classifier_heads(config)
    targets = config.find_target_modules(root)
    layer_cls = config.layer_class()
    for name in targets:
        module = root.get_submodule(name)
        if isinstance(module, layer_cls):
            config.update_layer(module, adapter_name, name)
        elif isinstance(module, AdapterLayer):
            raise TypeError(
                f"{name!r} already carries a {type(module).__name__}; mixing adapter methods on one module "
                "is not supported"
            )
        else:
            _set_child(root, name, config.create_layer(module, adapter_name, name))

    module_names = list(getattr(config, "modules_to_save", None) or [])
    if module_names:
        for name in find_modules_to_save(root, module_names):
            module = root.get_submodule(name)
            if not isinstance(module, ModulesToSaveWrapper):
                if isinstance(module, AdapterLayer):
                    raise ValueError(f"{name!r} is both an adapter target and in modules_to_save")
                module = ModulesToSaveWrapper(module)
                _set_child(root, name, module)
            module.add_adapter(adapter_name)
    return targets


def set_active_adapter(root: nn.Module, adapter_name: str | list[str], config: AdapterConfig | None) -> None:
    """Activate ``adapter_name`` everywhere and set ``requires_grad`` to match.

    Everything is frozen except the active adapter's tensors, its modules_to_save copies and the
    biases selected by ``config.bias``; nothing trains when ``config.inference_mode`` is set.
    """
    trainable = config is not None and not config.inference_mode
    names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
    for param in root.parameters():
        param.requires_grad_(False)
    for _, layer in adapter_layers(root):
        layer.set_adapter(names, trainable=trainable)
    for _, wrapper in save_wrappers(root):
        wrapper.set_adapter(names, trainable=trainable)
    if not trainable or config is None:
        return
    bias = getattr(config, "bias", "none")
    if bias == "all":
        for name, param in root.named_parameters():
            if name.endswith(".bias") or name == "bias":
                param.requires_grad_(True)
    elif bias == "lora_only":
        for _, layer in adapter_layers(root):
            base_bias = getattr(layer.base_layer, "bias", None)
            if isinstance(base_bias, nn.Parameter) and any(n in layer.adapter_names for n in names):
                base_bias.requires_grad_(True)


def delete_adapter(root: nn.Module, adapter_name: str) -> None:
    """Remove ``adapter_name``; wrappers left without adapters are replaced by their base module."""
    for name, layer in list(adapter_layers(root)):
        layer.delete_adapter(adapter_name)
        if not layer.adapter_names:
            _set_child(root, name, layer.base_layer)
    for name, wrapper in list(save_wrappers(root)):
        wrapper.delete_adapter(adapter_name)
        if not wrapper.adapter_names:
            _set_child(root, name, wrapper.original_module)


def set_disabled(root: nn.Module, disabled: bool) -> None:
    for _, layer in adapter_layers(root):
        layer.disable_adapters = disabled
    for _, wrapper in save_wrappers(root):
        wrapper.disable_adapters = disabled


def unload(root: nn.Module, merge: bool, adapter_names: list[str] | None = None) -> nn.Module:
    """Replace every wrapper by a plain module; with ``merge`` the active adapters are folded in.

    modules_to_save wrappers become the active adapter's copy (merged) or the original (unmerged).
    Returns ``root`` (modified in place).
    """
    for name, layer in list(adapter_layers(root)):
        if merge:
            layer.merge(adapter_names)
        else:
            layer.unmerge()
        _set_child(root, name, layer.base_layer)
    for name, wrapper in list(save_wrappers(root)):
        _set_child(root, name, wrapper.active_module() if merge else wrapper.original_module)
    return root


def count_parameters(module: nn.Module) -> tuple[int, int]:
    """(trainable, all) parameter counts, PEFT-compatible (ZeRO-3 ``ds_numel``, 4-bit packing)."""
    trainable = total = 0
    for param in module.parameters():
        n = param.numel()
        if n == 0 and hasattr(param, "ds_numel"):
            n = int(param.ds_numel)
        if type(param).__name__ == "Params4bit":
            itemsize: Any = param.element_size() if hasattr(param, "element_size") else 1
            n = n * 2 * int(itemsize)
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def cast_adapter(root: nn.Module, adapter_name: str, dtype: torch.dtype) -> None:
    """Store ``adapter_name``'s tensors in ``dtype`` (e.g. fp32 adapters on a bf16 base)."""
    for _, layer in adapter_layers(root):
        for tensor in layer.adapter_tensors(adapter_name).values():
            if tensor.is_floating_point():
                tensor.data = tensor.data.to(dtype)
