"""The Ray Train engine that every stage's training loop runs in.

Driver side: ``init_ray`` joins the cluster a ``ray job submit`` driver already belongs to (or
starts a private local one), and ``fit`` runs a stage's per-worker loop in a ``TorchTrainer``
with the YAML's ``ScalingConfig`` and ``FailureConfig``.

Worker side: the small set of collective helpers the loops share (rank, device, gathers, the
adapter-gradient all-reduce over gloo on CPU / NCCL on GPU), so each stage only writes its loss;
the optimiser, schedule and DeepSpeed engine are ``pipeline.backends``.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from raypeft.pipeline.config import RunConfig


# ------------------------------------------------------------------------------- driver

def init_ray(num_cpus: int | None = None) -> None:
    """Connect to the Ray cluster this process belongs to, or start a local one.

    Under ``ray job submit`` (or with RAY_ADDRESS set) ``ray.init()`` joins that cluster. A
    plain ``raypeft run`` on a laptop starts a private instance without the dashboard: nothing
    listens on the network unless the user asked for a cluster.
    """
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    kwargs: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": True}
    if os.environ.get("RAY_ADDRESS") or Path("/tmp/ray/ray_current_cluster").exists():
        ray.init(**kwargs)
    else:
        # The dashboard process also serves the State API that Ray Train's controller polls;
        # bound to loopback it is reachable from this machine only.
        ray.init(num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)


def fit(loop: Callable[[dict], None], payload: dict, cfg: RunConfig, *, run_name: str,
        callbacks: list | None = None):
    """Run ``loop(payload)`` on every worker of a ``TorchTrainer`` and return Ray's ``Result``.

    ``run_name`` names the Ray Train run folder under ``<output_dir>/<name>/ray``; re-using a
    name resumes from its latest checkpoint, which is how a restarted worker group continues.
    ``callbacks`` are Ray Train ``UserCallback``s (a sweep trial forwards reports to Ray Tune).
    A loss that turns NaN/inf ends the loop on every worker without a retry and raises
    ``pipeline.guards.NonFiniteLoss`` here, naming the step and the last good checkpoint.
    """
    from ray.train import FailureConfig, LoggingConfig, RunConfig as RayRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raypeft.pipeline import guards

    resources = cfg.scaling.resources_per_worker
    if resources is None and not cfg.scaling.use_gpu:
        resources = {"CPU": 1}
    storage = cfg.output_path() / "ray"
    verdict = guards.stop_file(storage / run_name)
    verdict.unlink(missing_ok=True)
    trainer = TorchTrainer(
        guards.stop_on_nonfinite(loop),  # a NaN/inf loss ends the stage, it is not retried
        train_loop_config={**payload, guards.STOP_FILE: str(verdict)},
        scaling_config=ScalingConfig(num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu,
                                     resources_per_worker=resources),
        run_config=RayRunConfig(
            name=run_name,
            storage_path=str(storage),
            failure_config=FailureConfig(max_failures=cfg.failure.max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=list(callbacks or []),
        ),
    )
    return guards.raise_if_stopped(trainer.fit(), verdict)


# ------------------------------------------------------------------------------- worker

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
    import datasets
    import transformers

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
    import ray.train
    import ray.train.torch

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
