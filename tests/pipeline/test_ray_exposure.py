"""A cluster short of the workers' resources: a bounded wait that asks the autoscaler, then one
clear error; and a private local Ray that keeps Ray's token auth on.

The waits run against a real local Ray (its ``cluster_resources`` and the autoscaler request
API) and against a resource count that changes while waiting (a cluster that grows).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from raypeft.pipeline import ray_cluster
from raypeft.pipeline.config import ConfigError, parse_config
from raypeft.pipeline.ray_cluster import ResourcesUnavailable, wait_for_resources


def _cfg(**scaling):
    return parse_config({"scaling": scaling})


def test_enough_resources_return_at_once_without_a_word() -> None:
    lines: list[str] = []
    wait_for_resources(_cfg(num_workers=2), lambda: {"CPU": 2.0}, log=lines.append, poll_s=0.01)
    assert lines == []


def test_a_cluster_that_grows_in_time_is_waited_for(monkeypatch) -> None:
    asked: list[list[dict]] = []
    monkeypatch.setattr(ray_cluster, "_ask_autoscaler", asked.append)
    answers = iter([{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 4.0}])
    lines: list[str] = []
    wait_for_resources(_cfg(num_workers=2, resources_per_worker={"CPU": 2}, resource_wait_s=30),
                       lambda: next(answers), log=lines.append, poll_s=0.01)
    assert asked == [[{"CPU": 2.0}, {"CPU": 2.0}], []]  # asked for both workers' bundles, withdrawn after
    assert len(lines) == 1 and "2 workers x 2 CPU each need 4 CPU, and there are 1" in lines[0]
    assert "waiting up to 30 s" in lines[0]


def test_a_cluster_that_never_grows_fails_after_the_bound() -> None:
    """On a real local Ray of one CPU: two one-CPU workers never fit; the wait ends after
    ``resource_wait_s`` with what is missing (Ray Train alone would wait forever)."""
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=1, include_dashboard=False, logging_level="ERROR")
    try:
        lines: list[str] = []
        started = time.monotonic()
        with pytest.raises(ResourcesUnavailable, match=r"scaling: 2 workers x 1 CPU each need 2 CPU, and there "
                                                       r"are 1 after waiting 1\.5 s \(scaling\.resource_wait_s\)"):
            wait_for_resources(_cfg(num_workers=2, resource_wait_s=1.5), ray.cluster_resources, log=lines.append,
                               poll_s=0.2)
        assert 1.4 < time.monotonic() - started < 10
        assert "Ctrl-C stops the run" in lines[0]
    finally:
        ray.shutdown()


@pytest.mark.parametrize("value,expect", [(0, "greater than 0"), (float("inf"), "finite"), ("soon", "number")])
def test_the_wait_bound_is_validated(value, expect: str) -> None:
    with pytest.raises(ConfigError, match=rf"scaling\.resource_wait_s: .*{expect}"):
        _cfg(resource_wait_s=value)


_PROBE = r"""
import os, sys, urllib.error, urllib.request
from raypeft.pipeline.launcher import init_ray
import ray
init_ray(num_cpus=1)
from ray._private.authentication.authentication_utils import is_token_auth_enabled
try:
    urllib.request.urlopen("http://127.0.0.1:" + os.environ["PORT"] + "/api/version", timeout=10)
    status = 200
except urllib.error.HTTPError as err:
    status = err.code
print("AUTH", os.environ.get("RAY_AUTH_MODE", "default"), is_token_auth_enabled(), status)
ray.shutdown()
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", [None, "disabled"])
def test_a_private_local_ray_keeps_token_auth_on(mode: str | None, tmp_path) -> None:
    """A plain run's local Ray: token auth on by default (the dashboard refuses a request without
    the token); a user who turned it off is told what that exposes. In a fresh process: Ray reads
    the mode when it is imported."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_ADDRESS="local", PORT="8265", **({"RAY_AUTH_MODE": mode} if mode else {}))
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, cwd=tmp_path, capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    verdict = next(line for line in out.stdout.splitlines() if line.startswith("AUTH"))
    if mode is None:
        assert verdict.endswith(" True 401"), verdict  # Ray sets RAY_AUTH_MODE=token itself
        assert "listen on every interface" not in out.stderr
    else:
        assert verdict.startswith("AUTH disabled False")
        assert ("Ray token auth is off (RAY_AUTH_MODE=disabled): this local Ray's GCS, raylet and workers listen on "
                "every interface") in out.stderr
