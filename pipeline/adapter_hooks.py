"""What some adapter methods add to a training step or a batch, behind one small interface.

Most methods train with the plain loop (forward, loss, backward, step). Two need more:

* AdaLoRA adds an orthogonality penalty to every loss and re-allocates its rank budget every
  step from that step's gradients, after the optimiser step as PEFT does. The gradients it
  scores are averaged over the workers first (each worker holds only its own until the backend's
  step), so every worker masks the same singular values. The schedule's ``total_step`` is the
  stage's step count unless the YAML sets it.
* Multitask prompt tuning needs each row's task id in every forward and ``generate`` call: from
  the ``data.columns.task_id`` column, else the fixed ``adapter.task_id`` (0 by default).

A loop asks :func:`adapter_hooks` once and calls the hooks at fixed points; for every other
method they do nothing, so stage code never branches on the method::

    hooks = adapter_hooks(model, cfg, total_steps=total_steps, train_rows=train_rows)
    loss = (model(**batch, **hooks.inputs(row_ids)).loss + hooks.loss_extra()) / accumulation
    ...backward...
    hooks.before_step(step); backend.step(); hooks.after_step(step)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from raypeft.adapters import AdaLoraConfig, MultitaskPromptTuningConfig, orthogonal_regularization, update_and_allocate
from raypeft.adapters.adalora import adalora_layers
from raypeft.pipeline import engine
from raypeft.pipeline.config import AdaLoraSpec, MultitaskPromptSpec, RunConfig


def _active_config(model: nn.Module) -> Any:
    """The active adapter's library config (``None`` for models without one, e.g. role containers)."""
    try:
        return model.active_peft_config  # type: ignore[attr-defined]
    except (AttributeError, ValueError):
        return None


class AdapterHooks:
    """The no-op hooks: what every method without extra training logic gets."""

    def inputs(self, row_ids: Sequence[int]) -> dict[str, torch.Tensor]:
        """Extra model inputs for a batch of training rows (their indices in the train set)."""
        return {}

    def loss_extra(self) -> torch.Tensor | float:
        """Added to each micro-batch's loss before it is scaled for accumulation."""
        return 0.0

    def before_step(self, step: int) -> None:
        """After the last backward of optimiser step ``step`` (0-based), before the update."""

    def after_step(self, step: int) -> None:
        """After the optimiser update of step ``step`` (0-based)."""


def _worker_mean_grads(params: list[nn.Parameter]) -> dict[int, torch.Tensor]:
    """Copies of ``params``' gradients averaged over the workers (the ``.grad`` tensors are left alone:
    the backend averages those itself in its step)."""
    grads = [p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    if engine.distributed() and grads:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= dist.get_world_size()
        grads = [chunk.view_as(g) for chunk, g in zip(flat.split([g.numel() for g in grads]), grads)]
    return {id(p): g for p, g in zip(params, grads)}


class AdaLoraHooks(AdapterHooks):
    """Orthogonal regularisation in the loss; rank allocation after every optimiser step."""

    def __init__(self, model: nn.Module, adapter_name: str, total_steps: int, fixed_total: bool) -> None:
        self.model = model
        self.adapter_name = adapter_name
        config: AdaLoraConfig = model.peft_config[adapter_name]  # type: ignore[index,assignment]
        if not fixed_total:
            config.total_step = int(total_steps)
        if config.tinit >= config.total_step - config.tfinal:  # type: ignore[operator]
            raise ValueError(
                f"adapter.tinit / adapter.tfinal: the AdaLoRA schedule has {config.total_step} steps; "
                f"tinit ({config.tinit}) + tfinal ({config.tfinal}) must leave a budgeting phase"
            )
        root = model.get_base_model()  # type: ignore[operator]
        self.params = [getattr(layer, attr)[adapter_name] for _, layer in adalora_layers(root, adapter_name)
                       for attr in ("lora_A", "lora_B", "lora_E")]
        self._grads: dict[int, torch.Tensor] = {}

    def loss_extra(self) -> torch.Tensor:
        return orthogonal_regularization(self.model, self.adapter_name)

    def before_step(self, step: int) -> None:
        self._grads = _worker_mean_grads(self.params)

    def after_step(self, step: int) -> None:
        grads = self._grads
        update_and_allocate(self.model, step, self.adapter_name, grad_getter=lambda p: grads.get(id(p)))
        self._grads = {}


class TaskIdHooks(AdapterHooks):
    """Each training row's task id as the ``task_ids`` input of multitask prompt tuning."""

    def __init__(self, task_ids: list[int]) -> None:
        self.task_ids = torch.tensor(task_ids, dtype=torch.long)

    def inputs(self, row_ids: Sequence[int]) -> dict[str, torch.Tensor]:
        return {"task_ids": self.task_ids[list(row_ids)]}


def row_task_ids(model: nn.Module, cfg: RunConfig, rows: Any) -> list[int] | None:
    """Per-row task ids of ``rows`` when ``model``'s active adapter is multitask prompt tuning
    (``data.columns.task_id``, else the fixed ``adapter.task_id`` or 0); ``None`` otherwise."""
    config = _active_config(model)
    if not isinstance(config, MultitaskPromptTuningConfig):
        return None
    num_tasks = int(config.num_tasks or 1)
    column = cfg.data.columns.task_id
    if column is None:
        fixed = cfg.adapter.task_id if isinstance(cfg.adapter, MultitaskPromptSpec) else None
        fixed = 0 if fixed is None else int(fixed)
        if fixed >= num_tasks:
            raise ValueError(f"adapter.task_id: must be below the adapter's num_tasks ({num_tasks}), got {fixed}")
        return [fixed] * len(rows)
    ids: list[int] = []
    for i, value in enumerate(rows[column]):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < num_tasks:
            raise ValueError(f"data.columns.task_id: row {i} of column '{column}' holds {value!r}; "
                             f"expected an integer in [0, {num_tasks})")
        ids.append(value)
    return ids


def adapter_hooks(model: nn.Module, cfg: RunConfig, *, total_steps: int, train_rows: Any) -> AdapterHooks:
    """The hooks ``model``'s active adapter needs in a training loop of ``total_steps`` steps over
    ``train_rows`` (the untokenized train rows, in train-set order)."""
    config = _active_config(model)
    if isinstance(config, AdaLoraConfig) and not config.inference_mode:
        fixed = isinstance(cfg.adapter, AdaLoraSpec) and cfg.adapter.total_step is not None
        return AdaLoraHooks(model, model.active_adapter, total_steps, fixed_total=fixed)  # type: ignore[arg-type]
    task_ids = row_task_ids(model, cfg, train_rows)
    if task_ids is not None:
        return TaskIdHooks(task_ids)
    return AdapterHooks()
