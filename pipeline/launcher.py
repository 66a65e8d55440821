"""The driver side of a stage: join (or start) Ray, and run the stage's loop in Ray Train.

``init_ray`` joins the cluster a ``ray job submit`` driver already belongs to (or starts a
private local one), and ``fit`` runs a stage's per-worker loop in a ``TorchTrainer`` with the
YAML's ``ScalingConfig`` and ``FailureConfig``, stopping (not retrying) on a non-finite loss.
What the loop itself calls on each worker is ``pipeline.engine``.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import ray
from ray.train import FailureConfig, LoggingConfig, RunConfig as RayRunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from raypeft.pipeline import nonfinite_loss, ray_cluster
from raypeft.pipeline.config import RunConfig


def init_ray(num_cpus: int | None = None) -> None:
    """Connect to the Ray cluster this process belongs to, or start a local one.

    Under ``ray job submit`` (or with RAY_ADDRESS set, or a live ``ray start`` recorded in
    /tmp/ray) ``ray.init()`` joins that cluster; ``pipeline.ray_cluster`` has already checked in
    preflight that it answers. Otherwise a private instance starts, its dashboard bound to 127.0.0.1
    (README, "Security", says what else listens).
    """
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    kwargs: dict[str, Any] = {"logging_level": "WARNING", "log_to_driver": True}
    address = ray_cluster.address_to_join()
    if address is not None:
        ray.init(address=address, **kwargs)
    else:
        # The dashboard process also serves the State API that Ray Train's controller polls;
        # bound to loopback it is reachable from this machine only. address="local": never a
        # stale cluster recorded in /tmp/ray.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)


def fit(loop: Callable[[dict], None], payload: dict, cfg: RunConfig, *, run_name: str,
        callbacks: list | None = None):
    """Run ``loop(payload)`` on every worker of a ``TorchTrainer`` and return Ray's ``Result``.

    ``run_name`` names the Ray Train run folder under ``<output_dir>/<name>/ray``; re-using a
    name resumes from its latest checkpoint, which is how a restarted worker group continues.
    ``callbacks`` are Ray Train ``UserCallback``s (a sweep trial forwards reports to Ray Tune).
    A loss that turns NaN/inf ends the loop on every worker without a retry and raises
    ``pipeline.nonfinite_loss.NonFiniteLoss`` here, naming the step and the last good checkpoint.
    """
    resources = cfg.scaling.resources_per_worker
    if resources is None and not cfg.scaling.use_gpu:
        resources = {"CPU": 1}
    storage = cfg.output_path() / "ray"
    verdict = nonfinite_loss.stop_file(storage / run_name)
    verdict.unlink(missing_ok=True)
    trainer = TorchTrainer(
        nonfinite_loss.stop_on_nonfinite(loop),  # a NaN/inf loss ends the stage, it is not retried
        train_loop_config={**payload, nonfinite_loss.STOP_FILE: str(verdict)},
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
    return nonfinite_loss.raise_if_stopped(trainer.fit(), verdict)
