"""The driver side of a stage: join (or start) Ray, and run the stage's loop in Ray Train.

``init_ray`` joins the cluster a ``ray job submit`` driver already belongs to (or starts a
private local one), and ``fit`` runs a stage's per-worker loop in a ``TorchTrainer`` with the
YAML's ``ScalingConfig`` and ``FailureConfig``, stopping (not retrying) on a non-finite loss.
What the loop itself calls on each worker is ``pipeline.engine``.
"""

from __future__ import annotations

import os
import sys
import threading
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
        # stale cluster recorded in /tmp/ray. The other servers listen on every interface (no
        # Ray option binds them to loopback), so token auth must stay on: Ray 2.59+ turns it on
        # for a local Ray by default (RAY_AUTH_MODE, read when ray is imported); a Ray or an
        # environment that has it off is told what that exposes.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)
        if not _token_auth_on():
            print(f"raypeft: warning: Ray token auth is off (RAY_AUTH_MODE={os.environ.get('RAY_AUTH_MODE', 'unset')}): "
                  "this local Ray's GCS, raylet and workers listen on every interface without authentication; anyone "
                  "who reaches them can run code as you (README, Security)", file=sys.stderr, flush=True)


def _token_auth_on() -> bool:
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
    except ImportError:  # a Ray before token auth (2.52)
        return False
    return bool(is_token_auth_enabled())


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
    # a cluster (a local Ray was checked in preflight) may grow: wait a bounded time for it
    ray_cluster.wait_for_resources(cfg, ray.cluster_resources,
                                   log=lambda line: print(line, file=sys.stderr, flush=True))
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
    return nonfinite_loss.raise_if_stopped(_fit_interruptibly(trainer), verdict)


def shutdown_ray() -> None:
    """Stop this driver's Ray (a private local Ray ends with its workers; a cluster only loses
    this driver's job), so an interrupted run leaves no stray processes."""
    if ray.is_initialized():
        ray.shutdown()


def _fit_interruptibly(trainer: TorchTrainer):
    """``trainer.fit()`` in a helper thread, so Ctrl-C reaches this driver as ``KeyboardInterrupt``.

    Called on the main thread, Ray Train installs its own SIGINT handler for the rest of the
    process: it aborts the controller and then calls ``sys.exit(0)``, which surfaces as exit 1
    with no message, and later stages of the workflow keep the handler of a dead controller. Off
    the main thread it installs none (as under Ray Tune); the caller ends the MLflow runs KILLED
    and ``launcher.shutdown_ray`` stops the workers.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = trainer.fit()
        except BaseException as exc:  # handed to the main thread as is
            box["error"] = exc

    thread = threading.Thread(target=target, name="raypeft-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)  # a bounded join: a signal is handled between joins
    if "error" in box:
        raise box["error"]
    return box["result"]
