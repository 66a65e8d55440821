"""Issue 19, class 4: a failure inside Ray is printed as its root cause and where the log is,
not as ``WorkerGroupError: Training failed due to worker errors:``."""

from __future__ import annotations

import re

import pytest
from ray.exceptions import RayTaskError
from ray.train import ControllerError, WorkerGroupError

from raypeft import cli
from raypeft.pipeline.failures import failure_line, root_cause


def _remote(exc: BaseException) -> BaseException:
    """What a worker's exception looks like on the driver: a RayTaskError that is also its class."""
    traceback = "Traceback (most recent call last):\n  ...\n" + repr(exc)
    return RayTaskError("train_fn", traceback, exc).as_instanceof_cause()


LOG = r" \(raised( on worker \d+)? inside Ray; full log: \S+\)$"
CASES = [  # (exception, expected line)
    (WorkerGroupError("rank 0: ...", {0: _remote(ValueError("sft.batch_size: too large\nmore text"))}),
     r"ValueError: sft\.batch_size: too large \(raised on worker 0 inside Ray; full log: \S+\)$"),
    (WorkerGroupError("...", {1: _remote(KeyError("dialogue")), 0: _remote(RuntimeError("CUDA out of memory"))}),
     r"RuntimeError: CUDA out of memory \(raised on worker 0" + LOG[len(r" \(raised( on worker \d+)?"):]),
    (WorkerGroupError("...", {3: _remote(MemoryError())}), r"MemoryError \(raised on worker 3 inside Ray"),
    (ControllerError(ValueError("resources_per_worker: cannot be scheduled")),
     r"ValueError: resources_per_worker: cannot be scheduled" + LOG),
    (ControllerError(_remote(OSError("No space left on device"))), r"OSError: No space left on device" + LOG),
    (_remote(ZeroDivisionError("division by zero")), r"ZeroDivisionError: division by zero" + LOG),
    (RuntimeError("the stage finished without reporting a checkpoint\nsecond line"),
     r"RuntimeError: the stage finished without reporting a checkpoint$"),
    (RuntimeError(), r"RuntimeError$"),
]


@pytest.mark.parametrize("exc,expect", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_failure_line_names_the_root_cause(exc: BaseException, expect: str) -> None:
    line = failure_line(exc)
    assert "\n" not in line
    assert re.match(expect, line), line
    assert not line.startswith(("WorkerGroupError", "ControllerError", "RayTaskError"))


def test_a_plain_chain_is_not_unwrapped() -> None:
    try:
        try:
            raise KeyError("x")
        except KeyError as inner:
            raise RuntimeError("what the user should read") from inner
    except RuntimeError as exc:
        assert root_cause(exc) is exc


def test_the_cli_prints_the_root_cause(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    failure = WorkerGroupError("...", {0: _remote(ValueError("ppo.data: a row has no prompt"))})

    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(cli, "load_config", lambda *a, **k: None)
    monkeypatch.setattr(cli, "run_workflow", fail)
    assert cli.main(["run", "x.yaml"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert re.match(r"raypeft: stage failed: ValueError: ppo\.data: a row has no prompt \(raised on worker 0 "
                    r"inside Ray; full log: \S+\)$", err[0]), err
