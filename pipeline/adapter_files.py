"""Is a saved adapter's weight file sound? Checked on the driver before any worker loads it.

``adapter_model.safetensors`` is read by every Ray worker (and by ``raypeft eval``); a file cut
short by a crashed copy, an empty one, one holding integer tensors, or one whose weights are
NaN or infinite would otherwise fail inside the workers (or train from garbage). Adapters are
small (megabytes), so reading every tensor once here costs little.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from raypeft.pipeline.config import ConfigError

SAFE_WEIGHTS = "adapter_model.safetensors"


def check_weights_file(folder: str | Path, field: str) -> None:
    """Refuse ``folder``'s safetensors file, naming ``field``, if it is empty, truncated or not
    safetensors, or holds a tensor that is not floating point or not finite."""
    path = Path(folder) / SAFE_WEIGHTS
    if not path.is_file():
        return  # a pickled adapter is converted (or refused) by adapter_inputs, which names it
    size = path.stat().st_size
    if size == 0:
        raise ConfigError(f"{field}: {path} is empty (0 bytes); the adapter was not saved completely")
    try:
        with safe_open(str(path), framework="pt") as fh:
            for name in fh.keys():
                _check_tensor(fh.get_tensor(name), name, path, field)
    except ConfigError:
        raise
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"{field}: {path} is not a readable safetensors file ({size} bytes; truncated or "
                          f"corrupt? {first[:160]})") from None


def _check_tensor(tensor: torch.Tensor, name: str, path: Path, field: str) -> None:
    if not tensor.is_floating_point():
        raise ConfigError(f"{field}: {path}: tensor {name} is {str(tensor.dtype).removeprefix('torch.')}, "
                          "expected a floating-point dtype")
    if tensor.numel() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ConfigError(f"{field}: {path}: tensor {name} has {bad} NaN or infinite values of {tensor.numel()}")
