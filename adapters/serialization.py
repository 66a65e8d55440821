"""PEFT-format adapter state dicts and the files that hold them.

Key format (as ``peft`` 0.21's ``get_peft_model_state_dict`` writes it; the adapter name is
stripped so an adapter can be loaded under any name):

* LoRA on Linear/Conv1D: ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight``
* LoRA on Embedding:     ``base_model.model.<module path>.lora_embedding_A`` / ``...B`` (no ``.weight``)
* ``modules_to_save``:   ``base_model.model.<module path>.<param>`` -- the copy's own keys, with no
  ``modules_to_save`` segment (older PEFT wrote ``<path>.modules_to_save.<param>``; read too)
* ``bias="all"``:        every ``*.bias`` under its model path (``<wrapped>.base_layer.bias`` for
  wrapped modules); ``bias="lora_only"``: ``<path>.base_layer.bias`` of adapted modules.
* Virtual-token methods (prompt tuning, P-tuning, prefix tuning): a single ``prompt_embeddings``
  tensor, the prompt encoder's output (see :mod:`adapters.virtual_tokens`).

Weights are stored as ``adapter_model.safetensors``. Pickled ``adapter_model.bin`` files are
refused unless the caller opts in, because unpickling runs code.
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .config import AdapterConfig
from .injection import adapter_layers, save_wrappers

PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
PICKLE_WEIGHTS_NAME = "adapter_model.bin"


class LoadResult(NamedTuple):
    """Keys the model expected but the state dict lacked, and keys nothing in the model took."""

    missing_keys: list[str]
    unexpected_keys: list[str]


def _bias_tensors(root: nn.Module, adapter_name: str, config: AdapterConfig) -> dict[str, torch.Tensor]:
    bias = getattr(config, "bias", "none")
    out: dict[str, torch.Tensor] = {}
    if bias == "all":
        wrapped = [name for name, _ in save_wrappers(root)]
        for name, param in root.named_parameters():
            if not (name.endswith(".bias") or name == "bias"):
                continue
            if any(name.startswith(w + ".") for w in wrapped):
                continue  # saved (in the copy's keys) through modules_to_save
            out[PREFIX + name] = param
    elif bias == "lora_only":
        for name, layer in adapter_layers(root):
            base_bias = getattr(layer.base_layer, "bias", None)
            if isinstance(base_bias, torch.Tensor) and adapter_name in layer.adapter_names:
                out[f"{PREFIX}{name}.base_layer.bias"] = base_bias
    return out


def adapter_tensor_map(
    root: nn.Module, adapter_name: str, config: AdapterConfig, for_saving: bool = False
) -> dict[str, torch.Tensor]:
    """The live tensors of ``adapter_name`` keyed by their PEFT checkpoint keys.

    ``root`` is the model being adapted (the transformers model). The tensors are the model's own
    parameters -- write into them to load, copy them to save. ``for_saving`` takes each layer's
    :meth:`~adapters.layer.AdapterLayer.saved_tensors` instead (possibly copies; only to be read).
    """
    out: dict[str, torch.Tensor] = {}
    for name, layer in adapter_layers(root):
        tensors = layer.saved_tensors(adapter_name) if for_saving else layer.adapter_tensors(adapter_name)
        for key, tensor in tensors.items():
            out[f"{PREFIX}{name}.{key}"] = tensor
    for name, wrapper in save_wrappers(root):
        for key, tensor in wrapper.adapter_tensors(adapter_name).items():
            out[f"{PREFIX}{name}.{key}"] = tensor
    out.update(_bias_tensors(root, adapter_name, config))
    return out


def get_adapter_state_dict(root: nn.Module, adapter_name: str, config: AdapterConfig) -> dict[str, torch.Tensor]:
    """A detached CPU copy of ``adapter_name``'s weights in PEFT format (safe to save or send)."""
    if not any(adapter_name in layer.adapter_names for _, layer in adapter_layers(root)) and not any(
        adapter_name in w.adapter_names for _, w in save_wrappers(root)
    ):
        raise KeyError(f"adapter {adapter_name!r} is not in the model")
    return {
        key: tensor.detach().to("cpu", copy=True).contiguous()
        for key, tensor in adapter_tensor_map(root, adapter_name, config, for_saving=True).items()
    }


def _with_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Accept state dicts whose keys lack ``base_model.model.`` (e.g. from transformers' PEFT integration)."""
    if state_dict and not any(k.startswith(PREFIX) for k in state_dict):
        return {PREFIX + k: v for k, v in state_dict.items()}
    return state_dict


def _copy_into(key: str, target: torch.Tensor, value: torch.Tensor) -> None:
    if tuple(target.shape) != tuple(value.shape):
        raise ValueError(
            f"adapter for a different base? {key}: saved {tuple(value.shape)} vs model {tuple(target.shape)}"
        )
    with torch.no_grad():
        target.copy_(value.to(device=target.device, dtype=target.dtype))


def set_adapter_state_dict(
    root: nn.Module,
    state_dict: dict[str, torch.Tensor],
    adapter_name: str,
    config: AdapterConfig,
) -> LoadResult:
    """Copy a PEFT-format state dict into the (already injected) adapter ``adapter_name``.

    Raises ``ValueError`` on a shape mismatch (naming the key) and when adapter weights are
    missing -- a partially loaded adapter would silently keep its random init. Keys that match
    other model tensors (e.g. the full embedding PEFT saves next to an embedding LoRA) are loaded
    into them; keys matching nothing are reported as unexpected with a warning.
    """
    state_dict = _with_prefix(state_dict)
    targets = adapter_tensor_map(root, adapter_name, config)
    bias_keys = set(_bias_tensors(root, adapter_name, config))
    legacy = {  # older PEFT: "<path>.modules_to_save.<param>"
        f"{PREFIX}{name}.modules_to_save.": f"{PREFIX}{name}." for name, _ in save_wrappers(root)
    }
    model_tensors: dict[str, torch.Tensor] | None = None
    loaded: set[str] = set()
    unexpected: list[str] = []
    for key, value in state_dict.items():
        target_key = key
        if target_key not in targets:
            for old, new in legacy.items():
                if key.startswith(old) and new + key[len(old):] in targets:
                    target_key = new + key[len(old):]
                    break
        if target_key in targets:
            _copy_into(key, targets[target_key], value)
            loaded.add(target_key)
            continue
        if model_tensors is None:
            model_tensors = {PREFIX + k: v for k, v in root.state_dict(keep_vars=True).items()}
        if key in model_tensors:
            _copy_into(key, model_tensors[key], value)
        else:
            unexpected.append(key)
    missing = [k for k in targets if k not in loaded]
    required = [k for k in missing if k not in bias_keys]
    if required:
        shown = ", ".join(required[:5]) + (f" (+{len(required) - 5} more)" if len(required) > 5 else "")
        raise ValueError(f"adapter {adapter_name!r}: checkpoint lacks {len(required)} adapter weight(s): {shown}")
    if unexpected:
        warnings.warn(
            f"adapter {adapter_name!r}: ignored {len(unexpected)} checkpoint key(s) that match nothing in the "
            f"model, e.g. {unexpected[0]}",
            stacklevel=2,
        )
    if missing:
        warnings.warn(f"adapter {adapter_name!r}: checkpoint has no value for {missing}", stacklevel=2)
    return LoadResult(missing, unexpected)


def save_adapter_weights(state_dict: dict[str, torch.Tensor], directory: str | os.PathLike[str]) -> str:
    """Write ``adapter_model.safetensors`` into ``directory``; return its path."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, WEIGHTS_NAME)
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    save_file(tensors, path, metadata={"format": "pt"})
    return path


def load_adapter_weights(
    directory: str | os.PathLike[str], device: str | torch.device = "cpu", allow_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """Read the adapter weights of ``directory`` (safetensors; ``.bin`` only with ``allow_pickle``)."""
    directory = os.fspath(directory)
    path = os.path.join(directory, WEIGHTS_NAME)
    if os.path.isfile(path):
        return load_file(path, device=str(device))
    pickle_path = os.path.join(directory, PICKLE_WEIGHTS_NAME)
    if os.path.isfile(pickle_path):
        if not allow_pickle:
            raise ValueError(
                f"{pickle_path!r} is a pickle file; refusing to load it (pickles can run code). "
                f"Convert it to {WEIGHTS_NAME} or pass allow_pickle=True if you trust it."
            )
        return torch.load(pickle_path, map_location=device, weights_only=True)
    raise FileNotFoundError(f"{directory!r} has no {WEIGHTS_NAME}")
