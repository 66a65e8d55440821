"""Which Ray a run will use, and whether it can ever hold the run's workers: decided on the
driver before Ray starts.

``raypeft run`` joins the cluster named by ``RAY_ADDRESS`` (``ray job submit`` sets it), or the
one ``ray start`` recorded in ``/tmp/ray/ray_current_cluster``, else starts a private local Ray.
Two things used to hang instead of failing: an address whose cluster is gone (``ray.init``
retries until killed; a stale record file did the same), and workers that ask for more than a
local Ray has (Ray Train waits for resources forever). Here the address is probed with one
bounded TCP connect, a stale record is ignored, and a local run's demand is compared with this
machine's CPUs and GPUs. A real cluster may grow (an autoscaler), so its demand is not refused
up front: :func:`wait_for_resources` asks the autoscaler for the workers' bundles and waits a
bounded time (``scaling.resource_wait_s``) for them, then fails with what is missing.
"""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Callable

import torch

from raypeft.pipeline.config import ConfigError, RunConfig

CURRENT_CLUSTER = Path("/tmp/ray/ray_current_cluster")
CONNECT_TIMEOUT_S = 5.0
# Resources a local Ray always has; any other name in resources_per_worker is a custom resource
# that only ``ray start --resources`` (a cluster) defines.
_BUILTIN = ("CPU", "GPU", "memory", "object_store_memory")


def _host_port(address: str) -> tuple[str, int] | None:
    rest = address.split("://", 1)[-1].rstrip("/")
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> str | None:
    """``None`` if a TCP connect to ``address`` (``host:port``, ``ray://host:port``) succeeds
    within ``timeout``; else why not, in a few words."""
    target = _host_port(address)
    if target is None:
        return "not host:port"
    try:
        with socket.create_connection(target, timeout=timeout):
            return None
    except socket.timeout:
        return f"no answer within {timeout:g} s"
    except ConnectionRefusedError:
        return "connection refused"
    except socket.gaierror:
        return "unknown host"
    except OSError as exc:
        return exc.strerror or type(exc).__name__


def _recorded_address() -> str | None:
    try:
        return CURRENT_CLUSTER.read_text().strip() or None
    except OSError:
        return None


def address_to_join() -> str | None:
    """The cluster this driver joins, or ``None`` for a private local Ray.

    ``RAY_ADDRESS`` (``auto``: the recorded cluster; ``local``: a private one) must answer, else
    ``ConfigError``. A recorded cluster that does not answer is a leftover of a dead ``ray
    start`` and is ignored.
    """
    env = os.environ.get("RAY_ADDRESS", "").strip()
    if env == "local":
        return None
    if env and env != "auto":
        why = reachable(env)
        if why is not None:
            raise ConfigError(f"RAY_ADDRESS: cannot reach the Ray cluster at {env} ({why}); start it "
                              "(ray start --head), or unset RAY_ADDRESS for a private local Ray")
        return env
    recorded = _recorded_address()
    if recorded is not None and reachable(recorded, timeout=1.0) is None:
        return recorded
    if env == "auto":
        raise ConfigError(f"RAY_ADDRESS: 'auto' but no running Ray cluster is recorded in {CURRENT_CLUSTER}; "
                          "start one (ray start --head), or unset RAY_ADDRESS for a private local Ray")
    return None


def local_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def worker_demand(cfg: RunConfig) -> dict[str, float]:
    """What one worker asks Ray for: the YAML's ``resources_per_worker``, else one CPU (or one GPU)."""
    resources = dict(cfg.scaling.resources_per_worker or {})
    if cfg.scaling.use_gpu:
        resources.setdefault("GPU", 1.0)
    elif not resources:
        resources = {"CPU": 1.0}
    return resources


def shortfall(cfg: RunConfig, have: dict[str, float]) -> str | None:
    """What the workers need that ``have`` (a resource -> amount map) lacks, in words, or ``None``."""
    n = cfg.scaling.num_workers
    for key, per in worker_demand(cfg).items():
        need = per * n
        if need > have.get(key, 0.0):
            return f"{n} workers x {per:g} {key} each need {need:g} {key}, and there are {have.get(key, 0.0):g}"
    return None


def check_local_resources(cfg: RunConfig, cpus: int, gpus: int) -> None:
    """Refuse workers a local Ray of ``cpus`` CPUs and ``gpus`` GPUs could never place."""
    n = cfg.scaling.num_workers
    demand = worker_demand(cfg)
    custom = sorted(k for k in demand if k not in _BUILTIN and demand[k] > 0)
    if custom:
        raise ConfigError(f"scaling.resources_per_worker.{custom[0]}: a custom resource, which a local Ray does "
                          "not have (define it with ray start --resources on a cluster)")
    for key, have, what in (("CPU", cpus, "CPUs"), ("GPU", gpus, "GPUs")):
        need = demand.get(key, 0.0) * n
        if need > have:
            per = demand[key]
            raise ConfigError(f"scaling.num_workers: {n} workers x {per:g} {key} each need {need:g} {what}; "
                              f"this machine has {have} (a local Ray would wait for them forever); use fewer "
                              "workers or less per worker" + (", or use_gpu: false" if key == "GPU" else ""))
    if cfg.scaling.use_gpu and demand.get("GPU", 0.0) <= 0:
        raise ConfigError("scaling.resources_per_worker.GPU: use_gpu: true needs a GPU amount above 0")


def check_ray(cfg: RunConfig) -> None:
    """Preflight: the cluster to join answers; a private local Ray can hold every worker."""
    if address_to_join() is not None:
        return
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    check_local_resources(cfg, local_cpus(), gpus)


class ResourcesUnavailable(RuntimeError):
    """The cluster did not get the workers' resources within ``scaling.resource_wait_s``."""


def _ask_autoscaler(bundles: list[dict[str, float]]) -> None:
    """Tell an autoscaler (if the cluster has one) the bundles to make room for; ``[]`` withdraws it.
    Without an autoscaler the request is recorded and nothing happens."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception:  # noqa: BLE001 - a cluster without an autoscaler API is a cluster that cannot grow
        pass


def wait_for_resources(cfg: RunConfig, cluster_resources: Callable[[], dict[str, float]], *,
                       log: Callable[[str], None], poll_s: float = 5.0) -> None:
    """Return once ``cluster_resources()`` holds every worker, else raise ``ResourcesUnavailable``
    after ``scaling.resource_wait_s`` seconds (``None``: wait on). Ray Train itself would wait
    forever with nothing said. While waiting, the workers' bundles are requested from the
    autoscaler (a cluster scales on pending demand, and none is pending before Ray Train starts)."""
    missing = shortfall(cfg, cluster_resources())
    if missing is None:
        return
    limit = cfg.scaling.resource_wait_s
    log(f"raypeft: warning: scaling: {missing} in the cluster now; waiting "
        + (f"up to {limit:g} s" if limit is not None else "until they come")
        + " for the cluster to grow (an autoscaler has been asked for them); Ctrl-C stops the run")
    _ask_autoscaler([worker_demand(cfg)] * cfg.scaling.num_workers)
    deadline = None if limit is None else time.monotonic() + limit
    try:
        while missing is not None:
            if deadline is not None and time.monotonic() >= deadline:
                raise ResourcesUnavailable(
                    f"scaling: {missing} after waiting {limit:g} s (scaling.resource_wait_s); add nodes, use "
                    "fewer workers or less per worker, or raise scaling.resource_wait_s")
            time.sleep(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic())))
            missing = shortfall(cfg, cluster_resources())
    finally:
        _ask_autoscaler([])
