"""How a stage's loop turns losses into updates: plain PyTorch, or a DeepSpeed engine.

Every stage loop is written once against :class:`Backend`::

    loss = backend.module(**batch).loss / accum
    backend.backward(loss)          # once per micro-batch
    backend.step()                  # once per optimiser step (after ``accum`` micro-batches)

- :class:`TorchBackend` (CPU, or GPUs without a DeepSpeed config): the adapter's gradients are
  averaged over workers with one flat all-reduce per step, then clipped and applied by AdamW.
  No DDP wrapper: a stage may run several forwards through different adapters (roles) per
  step, which DDP's per-forward hooks do not allow, and adapter gradients are small.
- :class:`DeepSpeedBackend` (``deepspeed:`` in the YAML: ``zero2``, ``zero3``, ``zero3_offload``, a
  JSON path or a mapping; see ``pipeline.deepspeed_configs``):
  ``deepspeed.initialize`` over the whole adapter model with only the trainable parameters in
  the optimiser. Under ZeRO-3 the frozen base is partitioned too (with parameter offload it
  lives in CPU memory) and gathered layer by layer in forward. Checkpoints hold the adapter
  (gathered from the partitions, never the full model) in PEFT format plus DeepSpeed's own
  partitioned optimiser state, each rank writing its own file; Ray Train merges the ranks'
  files into one checkpoint. Every forward whose output reaches a loss must go through
  ``backend.module`` (the engine): DeepSpeed prepares its gradient reduction from hooks it puts
  on the engine's outputs (``pipeline.roles.Roles.attach_entry`` routes role outputs there).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable

import ray.train
import torch
import torch.distributed as dist
from torch import nn

from raypeft.adapters.quantization import is_quantized_param
from raypeft.pipeline import checkpoint, engine

DS_DIR = "deepspeed"
DS_TAG = "state"


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise RuntimeError("the model has no trainable parameters: the adapter did not attach")
    return params


def lr_lambda(kind: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Linear warm-up then constant, linear or cosine decay to zero at ``total_steps``."""
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return 1.0 - progress if kind == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


class Backend:
    """The training engine of one worker. Subclasses implement the update and the checkpoint."""

    name = "torch"

    def __init__(self, model: nn.Module) -> None:
        self.model = model  # the unwrapped adapter model (or roles container)
        self.module: nn.Module = model  # what the loop calls for forward passes

    # -- training
    def backward(self, loss: torch.Tensor) -> None:
        raise NotImplementedError

    def step(self) -> None:
        raise NotImplementedError

    def lr(self) -> float:
        raise NotImplementedError

    # -- what needs collectives under ZeRO-3
    def gathered(self) -> contextlib.AbstractContextManager:
        """Inside it, every trainable parameter is whole on every rank (a no-op unless ZeRO-3)."""
        return contextlib.nullcontext()

    def generate_kwargs(self) -> dict[str, Any]:
        """Extra ``generate`` arguments; ZeRO-3 needs every rank to keep stepping until all finish."""
        return {}

    def whole_model(self) -> contextlib.AbstractContextManager:
        """Inside it, every parameter of the model is whole on this rank and a forward pass needs no
        collective (ZeRO-3: gathered once, its per-module gathering hooks lifted until the exit,
        which every rank must reach together); a no-op otherwise. For generation only: no
        gradients flow inside."""
        return contextlib.nullcontext()

    @property
    def lockstep(self) -> bool:
        """Whether every rank must run the same number of forward passes (ZeRO-3 gathers per forward)."""
        return False

    # -- checkpoints
    def save(self, folder: Path, *, is_main: bool, write_adapter: Callable[[Path], None],
             state: dict[str, Any]) -> None:
        raise NotImplementedError

    def restore(self, folder: Path, *, read_adapter: Callable[[Path], None]) -> dict[str, Any]:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name}


class TorchBackend(Backend):
    """AdamW over the trainable parameters; gradients averaged over workers once per step.

    ``clip_groups`` clips each group of parameters to ``max_grad_norm`` on its own (PPO: the
    critic's early, large value errors must not shrink the policy's step); default: all at once.
    """

    name = "torch"

    def __init__(self, model: nn.Module, *, lr: float, weight_decay: float, scheduler: str, warmup_steps: int,
                 total_steps: int, max_grad_norm: float | None,
                 clip_groups: list[list[nn.Parameter]] | None = None) -> None:
        super().__init__(model)
        self.params = trainable_parameters(model)
        _broadcast_from_rank0(self.params)  # each worker seeded its fresh adapter differently
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(scheduler, warmup_steps,
                                                                                      total_steps))
        self.max_grad_norm = max_grad_norm
        self.clip_groups = [g for g in clip_groups if g] if clip_groups else [self.params]

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        engine.all_reduce_gradients(self.params)
        if self.max_grad_norm:
            for group in self.clip_groups:
                torch.nn.utils.clip_grad_norm_(group, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def save(self, folder: Path, *, is_main: bool, write_adapter: Callable[[Path], None],
             state: dict[str, Any]) -> None:
        if not is_main:
            return
        write_adapter(folder / checkpoint.ADAPTER_DIR)
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "state": dict(state)}, folder / checkpoint.STATE_FILE)
        checkpoint.mark_complete(folder, state)

    def restore(self, folder: Path, *, read_adapter: Callable[[Path], None]) -> dict[str, Any]:
        checkpoint.require_complete(folder)
        read_adapter(folder / checkpoint.ADAPTER_DIR)
        blob = torch.load(folder / checkpoint.STATE_FILE, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        return blob["state"]


def _broadcast_from_rank0(params: list[nn.Parameter]) -> None:
    """Give every worker rank 0's values of ``params`` (one flat broadcast), as DDP does at start."""
    if not engine.distributed() or not params:
        return
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    dist.broadcast(flat, src=0)
    offset = 0
    with torch.no_grad():
        for p in params:
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()


def _partition_for_zero3(model: nn.Module, ds_config: dict[str, Any]) -> None:
    """Partition ``model`` for ZeRO-3 now, one tensor at a time, before ``deepspeed.initialize``.

    Otherwise DeepSpeed first moves the whole module to the accelerator and partitions it there:
    every GPU would hold the full base once, so its peak memory would not shrink with more GPUs.
    A base loaded on CPU (``pipeline.stages.common.base_device``) thus never sits whole on one
    GPU; with ``offload_param`` its partitions stay in CPU memory. Floating parameters take the
    engine's precision first (what DeepSpeed would otherwise cast after partitioning; packed
    4-bit / int8 weights excepted), and buffers move to the accelerator, which DeepSpeed leaves
    to the caller for an already partitioned model. Rank 0's values win (DeepSpeed broadcasts).
    """
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    dtype = (torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") is True else
             torch.float16 if ds_config.get("fp16", {}).get("enabled") is True else None)
    if dtype is not None:
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype and not is_quantized_param(p):
                p.data = p.data.to(dtype)
    deepspeed.init_distributed(dist_init_required=False)  # Ray Train's group: Init reads its world size
    deepspeed.zero.Init(module=model, config_dict_or_path=ds_config)
    device = torch.device(get_accelerator().current_device_name())
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)


def load_deepspeed_config(source: str | dict[str, Any]) -> dict[str, Any]:
    """A DeepSpeed config from a JSON file path or an inline mapping (a copy: it gets filled in)."""
    if isinstance(source, dict):
        return json.loads(json.dumps(source))
    path = Path(source).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"DeepSpeed config {source} not found")
    return json.loads(path.read_text())


def fill_deepspeed_config(ds: dict[str, Any], *, micro_batch_size: int, grad_accum: int, world_size: int,
                          max_grad_norm: float | None, dtype: str) -> dict[str, Any]:
    """Fill the fields a stage knows (batch sizes, clipping, precision) where the file says ``auto``.

    A value the file sets explicitly wins, except the batch arithmetic, which must agree with the
    loop's; a mismatch is an error rather than a silently different run.
    """
    def put(key: str, value: Any) -> None:
        if ds.get(key, "auto") == "auto":
            ds[key] = value
        elif ds[key] != value:
            raise ValueError(f"deepspeed.{key}: the file says {ds[key]}, but the stage runs {value} "
                             f"(set it to \"auto\" or match the stage config)")

    put("train_micro_batch_size_per_gpu", micro_batch_size)
    put("gradient_accumulation_steps", grad_accum)
    put("train_batch_size", micro_batch_size * grad_accum * world_size)
    if ds.get("gradient_clipping", "auto") == "auto":
        ds["gradient_clipping"] = max_grad_norm or 0.0
    for key, wanted in (("bf16", dtype == "bfloat16"), ("fp16", dtype == "float16")):
        section = ds.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = wanted
    # Our optimiser is a plain torch AdamW over adapter-sized tensors: allow it with offload
    # instead of forcing DeepSpeed's compiled CPU Adam (which would JIT-build an extension).
    ds.setdefault("zero_force_ds_cpu_optimizer", False)
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


class DeepSpeedBackend(Backend):
    """A DeepSpeed engine over the adapter model; ZeRO stage and offload come from its config."""

    name = "deepspeed"

    def __init__(self, model: nn.Module, ds_config: dict[str, Any], *, lr: float, weight_decay: float,
                 scheduler: str, warmup_steps: int, total_steps: int) -> None:
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")  # says so instead of warning that it guessed
        # DeepSpeed 0.19 still calls collectives torch 2.10+ marks deprecated, once per gather.
        warnings.filterwarnings("ignore", message=r".*torch\.distributed\.(all_gather_into_tensor|"
                                                  r"reduce_scatter_tensor).* is deprecated", category=FutureWarning)
        import deepspeed

        super().__init__(model)
        self.params = trainable_parameters(model)
        self.ds_config = ds_config
        zero = ds_config.get("zero_optimization", {})
        self.zero_stage = int(zero.get("stage", 0))
        if self.zero_stage == 3:
            _partition_for_zero3(model, ds_config)
        if "optimizer" in ds_config:
            optimizer = None  # DeepSpeed builds the one the file names
        else:
            optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay)
        sched = (None if optimizer is None else
                 torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(scheduler, warmup_steps, total_steps)))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=self.params, optimizer=optimizer, lr_scheduler=sched,
            config=ds_config, dist_init_required=False,
        )
        self.module = self.engine
        self.offload = {k: zero.get(f"offload_{k}", {}).get("device", "none") for k in ("optimizer", "param")}

    def backward(self, loss: torch.Tensor) -> None:
        # The loop already divides by the accumulation count; DeepSpeed must not divide again.
        self.engine.backward(loss, scale_wrt_gas=False)
        # DeepSpeed counts micro-steps in step(): it only updates at the accumulation boundary.
        self.engine.step()

    def step(self) -> None:
        """Nothing left to do: ``backward`` already called ``engine.step()`` at the boundary."""

    def lr(self) -> float:
        return float(self.engine.get_lr()[0])

    @property
    def lockstep(self) -> bool:
        return self.zero_stage == 3 and engine.distributed()

    def gathered(self) -> contextlib.AbstractContextManager:
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(self.params, modifier_rank=None)

    def generate_kwargs(self) -> dict[str, Any]:
        return {"synced_gpus": True} if self.lockstep else {}

    def whole_model(self) -> contextlib.AbstractContextManager:
        if self.zero_stage != 3:
            return contextlib.nullcontext()
        # DeepSpeed's own: GatheredParameters over the whole module, the ZeRO-3 module hooks
        # removed inside and registered again after.
        from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

        return unwrap_model_for_generation(self.engine)

    def save(self, folder: Path, *, is_main: bool, write_adapter: Callable[[Path], None],
             state: dict[str, Any]) -> None:
        """Every rank writes its optimiser partition; rank 0 also the PEFT adapter and the marker."""
        # Frozen base weights are excluded: they are reloaded from the model's source.
        self.engine.save_checkpoint(str(folder / DS_DIR), tag=DS_TAG, client_state={"raypeft": dict(state)},
                                    exclude_frozen_parameters=True)
        with self.gathered():
            if is_main:
                write_adapter(folder / checkpoint.ADAPTER_DIR)
        if is_main:
            checkpoint.mark_complete(folder, state)

    def restore(self, folder: Path, *, read_adapter: Callable[[Path], None]) -> dict[str, Any]:
        """DeepSpeed's own files hold the trainable weights (as partitions) next to the optimiser's,
        so ``read_adapter`` is not needed here: the PEFT folder is for people and later stages."""
        checkpoint.require_complete(folder)
        _, client = self.engine.load_checkpoint(str(folder / DS_DIR), tag=DS_TAG, load_module_strict=False,
                                                load_optimizer_states=True, load_lr_scheduler_states=True)
        if client is None:
            raise RuntimeError(f"{folder}: DeepSpeed could not load its checkpoint")
        return dict(client.get("raypeft", {}))

    def describe(self) -> dict[str, Any]:
        return {"engine": self.name, "zero_stage": self.zero_stage, "offload_optimizer": self.offload["optimizer"],
                "offload_param": self.offload["param"]}


def build_backend(model: nn.Module, *, deepspeed_config: str | dict[str, Any] | None, micro_batch_size: int,
                  grad_accum: int, world_size: int, lr: float, weight_decay: float, scheduler: str,
                  warmup_steps: int, total_steps: int, max_grad_norm: float | None, dtype: str,
                  clip_groups: list[list[nn.Parameter]] | None = None) -> Backend:
    """The backend a stage's YAML asks for: DeepSpeed when it names a config, else plain PyTorch.

    ``clip_groups`` (per-group gradient clipping) applies to plain PyTorch only: DeepSpeed clips
    the global norm of all trainable parameters, as its ``gradient_clipping`` says.
    """
    if deepspeed_config is None:
        return TorchBackend(model, lr=lr, weight_decay=weight_decay, scheduler=scheduler, warmup_steps=warmup_steps,
                            total_steps=total_steps, max_grad_norm=max_grad_norm, clip_groups=clip_groups)
    ds = fill_deepspeed_config(load_deepspeed_config(deepspeed_config), micro_batch_size=micro_batch_size,
                               grad_accum=grad_accum, world_size=world_size, max_grad_norm=max_grad_norm,
                               dtype=dtype)
    return DeepSpeedBackend(model, ds, lr=lr, weight_decay=weight_decay, scheduler=scheduler,
                            warmup_steps=warmup_steps, total_steps=total_steps)


def pad_for_lockstep(items: list[Any], batch_size: int, lockstep: bool, filler: Any) -> list[Any]:
    """This rank's shard, padded so every rank runs as many batches as the busiest one.

    Under ZeRO-3 each forward gathers parameters collectively, so sharded generation must make
    the same number of ``generate`` calls on every rank. The caller drops the padding rows
    (they are at the end).
    """
    if not lockstep:
        return items
    most = max(engine.all_gather(len(items)))
    target = math.ceil(most / batch_size) * batch_size if most else 0
    return items + [filler] * (target - len(items))


def report_checkpoint(backend: Backend, metrics: dict[str, Any], *, is_main: bool,
                      write_adapter: Callable[[Path], None], state: dict[str, Any]) -> None:
    """Save through ``backend`` into a temp folder on every rank and report it to Ray Train.

    Ray Train merges the ranks' folders into one checkpoint (DeepSpeed's per-rank optimiser
    partitions sit next to rank 0's adapter); a rank with nothing to write reports metrics only.
    """
    with tempfile.TemporaryDirectory(prefix="raypeft-ckpt-") as tmp:
        folder = Path(tmp)
        backend.save(folder, is_main=is_main, write_adapter=write_adapter, state=state)
        wrote = any(folder.iterdir())
        ray.train.report(dict(metrics), checkpoint=ray.train.Checkpoint.from_directory(tmp) if wrote else None)
