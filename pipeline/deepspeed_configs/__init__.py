"""The DeepSpeed configs raypeft ships, and what the YAML's ``deepspeed:`` key may name.

``deepspeed:`` takes a shipped name (``zero2``, ``zero3``, ``zero3_offload``), a path to a
DeepSpeed JSON file, an inline mapping, or null (plain PyTorch). The named files live inside
this package (package data), not only under ``configs/deepspeed/`` in the repository, so that
they resolve the same after ``pip install`` and under ``ray job submit --working-dir``; the
copies in ``configs/deepspeed/`` are the documented ones and a test keeps both identical.

Only what raypeft itself relies on is checked here (a JSON object, a ZeRO stage of 0-3, an
offload device DeepSpeed knows); everything else is DeepSpeed's to judge. Fields a stage knows
(batch sizes, clipping, precision) may be ``"auto"``: ``pipeline.backends.fill_deepspeed_config``
fills them per stage.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

NAMES = ("zero2", "zero3", "zero3_offload")
_OFFLOAD_DEVICES = ("none", "cpu", "nvme")


def named_config_text(name: str) -> str:
    """The JSON text of a shipped config (``name`` in :data:`NAMES`)."""
    if name not in NAMES:
        raise ValueError(f"unknown DeepSpeed config name {name!r}; expected one of {', '.join(NAMES)}")
    return resources.files(__package__).joinpath(f"{name}.json").read_text()


def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{where} must hold a JSON object, got {type(data).__name__}")
    return data


def check(ds: dict[str, Any]) -> dict[str, Any]:
    """Raise ``ValueError`` (naming the key) where ``ds`` contradicts what a stage can run; return ``ds``."""
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        raise ValueError(f"zero_optimization must be a mapping, got {type(zero).__name__}")
    stage = zero.get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    for kind in ("optimizer", "param"):
        section = zero.get(f"offload_{kind}")
        if section is None:
            continue
        device = section.get("device", "none") if isinstance(section, dict) else section
        if device not in _OFFLOAD_DEVICES:
            raise ValueError(f"zero_optimization.offload_{kind}.device must be one of "
                             f"{', '.join(_OFFLOAD_DEVICES)}, got {device!r}")
        if kind == "param" and device != "none" and stage != 3:
            raise ValueError(f"zero_optimization.offload_param needs stage 3, got stage {stage}")
    return ds


def resolve(value: str | dict[str, Any] | None, *, base_dir: Path | None = None) -> dict[str, Any] | None:
    """The DeepSpeed config ``value`` names, as a fresh dict (None stays None: plain PyTorch).

    A string is a shipped name or a path (relative paths against ``base_dir``, default the
    current folder). Raises ``ValueError`` with a one-line reason.
    """
    if value is None:
        return None
    if isinstance(value, dict):
        return check(json.loads(json.dumps(value)))
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a config name ({', '.join(NAMES)}), a JSON file path or a mapping")
    if value in NAMES:
        return check(_parse(named_config_text(value), f"shipped config {value}"))
    path = Path(value).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        hint = f"not a shipped config ({', '.join(NAMES)}) and no such file {path}"
        raise ValueError(hint)
    return check(_parse(path.read_text(), str(path)))


def summary(ds: dict[str, Any] | None) -> dict[str, str]:
    """Engine, ZeRO stage and offload devices of a resolved config (for tags and logs)."""
    if ds is None:
        return {"engine": "torch", "zero_stage": "none", "offload_optimizer": "none", "offload_param": "none"}
    zero = ds.get("zero_optimization", {})

    def device(kind: str) -> str:
        section = zero.get(f"offload_{kind}") or {}
        return str(section.get("device", "none") if isinstance(section, dict) else section)

    return {"engine": "deepspeed", "zero_stage": str(zero.get("stage", 0)),
            "offload_optimizer": device("optimizer"), "offload_param": device("param")}
