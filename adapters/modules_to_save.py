"""Fully trained module copies (``modules_to_save``), e.g. a new classification head.

The original module stays frozen and untouched; each adapter that lists the module gets its own
trainable deep copy, used while that adapter is active. Attribute names (``original_module``,
``modules_to_save``) match PEFT's ``ModulesToSaveWrapper`` so state-dict keys line up.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .routing import RowRouting, gather_groups, take_rows


class ModulesToSaveWrapper(nn.Module):
    """Route calls to the active adapter's copy of a module, or to the frozen original."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None
        self.disable_adapters: bool = False
        # per-row adapter choice of a mixed-adapter batch (see adapters.mixed_batch); None otherwise
        self._routing: RowRouting | None = None

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def add_adapter(self, adapter_name: str) -> None:
        """Give ``adapter_name`` its own copy of the original module (frozen until made trainable)."""
        if adapter_name in self.modules_to_save:
            raise ValueError(f"adapter {adapter_name!r} already has a copy of this module")
        module_copy = copy.deepcopy(self.original_module)
        module_copy.requires_grad_(False)
        self.modules_to_save[adapter_name] = module_copy

    def set_adapter(self, adapter_names: str | Iterable[str], trainable: bool = True) -> None:
        """Use the first of ``adapter_names`` that has a copy here; only that copy is trainable."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self.active_adapter = next((n for n in names if n in self.modules_to_save), None)
        for name, module in self.modules_to_save.items():
            module.requires_grad_(trainable and name == self.active_adapter)

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name in self.modules_to_save:
            del self.modules_to_save[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = None

    def adapter_tensors(self, adapter_name: str) -> dict[str, torch.Tensor]:
        """The copy's state dict (parameters and persistent buffers), as PEFT saves it."""
        if adapter_name not in self.modules_to_save:
            return {}
        return dict(self.modules_to_save[adapter_name].state_dict(keep_vars=True))

    def active_module(self) -> nn.Module:
        """The module forward currently uses."""
        if self.disable_adapters or self.active_adapter is None:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._routing is not None and not self.disable_adapters and args:
            return self._grouped_forward(*args, **kwargs)
        return self.active_module()(*args, **kwargs)

    def _grouped_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """A mixed-adapter batch: each row group through its adapter's copy (others: the original)."""
        assert self._routing is not None
        outputs = []
        for name, rows in self._routing.groups(x.shape[0], x.device):
            module = self.modules_to_save[name] if name in self.modules_to_save else self.original_module
            y = module(take_rows(x, rows), *args, **kwargs)
            if not isinstance(y, torch.Tensor):
                raise TypeError(
                    f"mixed-adapter batches need modules_to_save modules that return a tensor; "
                    f"{type(module).__name__} returned {type(y).__name__}"
                )
            outputs.append((rows, y))
        return gather_groups(outputs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save"):
                raise
            return getattr(super().__getattr__("original_module"), name)
