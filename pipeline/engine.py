"""What a stage's training loop runs on inside each Ray Train worker.

The small set of helpers every loop shares: where this copy runs (rank, world size, device), a
seeded and quiet start, progress lines, and the collectives (gathers, scalar reductions, the
adapter-gradient all-reduce over gloo on CPU / NCCL on GPU), so each stage only writes its loss.
The optimiser, schedule and DeepSpeed engine are ``pipeline.backends``; starting the workers
(the driver side) is ``pipeline.launcher``.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

import datasets
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import transformers

from raypeft.pipeline.config import RunConfig


@dataclass(frozen=True)
class Worker:
    """Where this copy of the loop runs."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def say(message: str) -> None:
    """One progress line on the worker's real stdout.

    Ray Train patches ``print`` to go through its logger and also tees it to ``sys.stdout``
    when a library has wrapped that stream, which shows every line twice on the driver.
    """
    print(message, file=sys.__stdout__, flush=True)


def quiet_libraries() -> None:
    """No per-worker progress bars for weight loading and dataset maps: the step log is the progress."""
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    # Ray Train logs every report with its whole metrics dict at INFO; its logger is named
    # after its source file, so find it by that name rather than importing a private module.
    for name in list(logging.root.manager.loggerDict):
        if name.endswith(os.path.join("execution", "context.py")):
            logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)  # rouge_score's "Using default tokenizer."


def setup_worker(cfg: RunConfig) -> Worker:
    """Seed, thread count and device for this worker.

    Ray gives a CPU worker ``resources_per_worker["CPU"]`` slots; torch would otherwise spawn a
    thread per core of the node and the workers would fight over the same cores.
    """
    quiet_libraries()
    ctx = ray.train.get_context()
    cpus = (cfg.scaling.resources_per_worker or {}).get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    torch.manual_seed(cfg.seed + ctx.get_world_rank())
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    return Worker(ctx.get_world_rank(), ctx.get_world_size(), device)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_gather(obj: Any) -> list[Any]:
    """Every worker's ``obj``, in rank order (a one-element list without a process group)."""
    if not distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def collective_device() -> torch.device:
    """Where small tensors for a collective must live: NCCL (GPU workers) takes only CUDA tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce(values: list[float], op: str = "mean", device: torch.device | None = None) -> list[float]:
    """Reduce a few scalars across workers (loss means, token sums) in one collective."""
    if not distributed():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device or collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    if op == "mean":
        t /= dist.get_world_size()
    return t.tolist()


def barrier() -> None:
    if distributed():
        dist.barrier()


def all_reduce_gradients(params: list[torch.nn.Parameter]) -> None:
    """Average the gradients of ``params`` over workers, in one flat all-reduce.

    The reward, DPO and PPO loops switch roles (adapters) inside one step, and a PPO step trains
    two roles at once; DDP's hooks assume every backward comes from one forward of one module
    with a fixed set of parameters. One explicit all-reduce after backward does the same
    averaging without those assumptions. A parameter without a gradient counts as zero.
    """
    if not distributed() or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n
