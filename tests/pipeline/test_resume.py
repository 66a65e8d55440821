"""Issue 19, class 5 without Ray: when a rerun resumes, what it skips, which stale MLflow runs it
closes, and one driver per output folder (the Ray test, a SIGKILLed driver and its rerun, is
``test_resume_ray.py``; Ctrl-C's exit code and line are in ``test_failure_line.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from raypeft import cli
from raypeft.pipeline import resume, tracking, workflow
from raypeft.pipeline.config import ConfigError, parse_config

FP = "f" * 64


def _state(status: str = resume.RUNNING, fingerprint: str = FP, **stages: resume.StageRecord) -> resume.WorkflowState:
    return resume.WorkflowState(fingerprint, "parent", "host:1", status, dict(stages))


def _adapter(folder: Path, weights: bytes = b"w") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "adapter_model.safetensors").write_bytes(weights)
    return folder


RESUMABLE = [  # (state, fingerprint, resumed?)
    (None, FP, False),
    (_state(), FP, True),
    (_state(resume.FINISHED), FP, False),   # a finished workflow reruns from the start
    (_state(resume.FAILED), FP, False),     # so does a failed one (it would fail the same way)
    (_state(), "0" * 64, False),            # the config changed
]


@pytest.mark.parametrize("state,fingerprint,resumed", RESUMABLE)
def test_when_a_rerun_resumes(state, fingerprint: str, resumed: bool) -> None:
    assert (resume.resumable(state, fingerprint) is not None) == resumed


def test_a_finished_stage_is_skipped_only_while_its_adapter_is_unchanged(tmp_path: Path) -> None:
    folder = _adapter(tmp_path / "sft" / "adapter")
    done = resume.StageRecord(resume.FINISHED, "r1", resume.adapter_fingerprint(folder))
    state = _state(sft=done, reward=resume.StageRecord(resume.RUNNING, "r2"))
    assert resume.finished_record(state, "sft", folder) is done
    assert resume.finished_record(state, "reward", folder) is None
    assert resume.interrupted_run(state, "reward") == "r2" and resume.interrupted_run(state, "sft") is None
    _adapter(folder, b"other weights")
    assert resume.finished_record(state, "sft", folder) is None       # replaced since: rerun it
    (folder / "adapter_model.safetensors").unlink()
    assert resume.finished_record(state, "sft", folder) is None       # gone: rerun it


def test_state_round_trips_and_a_damaged_file_means_start_over(tmp_path: Path) -> None:
    state = _state(sft=resume.StageRecord(resume.FINISHED, "r1", "abc", 3, {"loss": 0.5}))
    resume.save(tmp_path, state)
    assert resume.load(tmp_path) == state
    (tmp_path / resume.STATE_FILE).write_text("{not json")
    assert resume.load(tmp_path) is None


def test_driver_alive() -> None:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert resume.driver_alive(resume.this_driver())
    assert not resume.driver_alive(f"{resume.this_driver().rsplit(':', 1)[0]}:{dead.pid}")
    assert resume.driver_alive(f"some-other-host:{dead.pid}")  # cannot be asked: assumed alive


def test_a_second_driver_of_the_same_output_folder_is_refused(tmp_path: Path) -> None:
    with resume.output_lock(tmp_path / "out"):
        with pytest.raises(ConfigError, match=r"output_dir: another raypeft run \(.*:\d+\) is writing .*/out; "
                                              r"wait for it to end, or give this run another name"):
            with resume.output_lock(tmp_path / "out"):
                pass
    with resume.output_lock(tmp_path / "out"):  # released with the first block
        pass


def test_stale_runs_of_a_dead_driver_are_closed_killed(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    experiment = tracking.connect(uri, "e", (tmp_path / "a").as_uri())
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = resume.this_driver().rsplit(":", 1)[0]
    runs = {
        "dead": tracking.start_run(experiment, "x", tags={"raypeft.workflow": "w",
                                                          "raypeft.driver": f"{host}:{dead.pid}"}),
        "alive": tracking.start_run(experiment, "x", tags={"raypeft.workflow": "w",
                                                           "raypeft.driver": resume.this_driver()}),
        "kept": tracking.start_run(experiment, "x", tags={"raypeft.workflow": "w",
                                                          "raypeft.driver": f"{host}:{dead.pid}"}),
        "other-workflow": tracking.start_run(experiment, "x", tags={"raypeft.workflow": "v",
                                                                    "raypeft.driver": f"{host}:{dead.pid}"}),
        "untagged": tracking.start_run(experiment, "x", tags={"raypeft.workflow": "w"}),
    }
    lines: list[str] = []
    workflow._close_stale_runs(experiment, parse_config({"name": "w"}), {runs["kept"]}, lines.append)
    client = MlflowClient(uri)
    status = {k: client.get_run(v).info.status for k, v in runs.items()}
    assert status == {"dead": "KILLED", "alive": "RUNNING", "kept": "RUNNING", "other-workflow": "RUNNING",
                      "untagged": "RUNNING"}
    assert len(lines) == 1 and "closed MLflow run" in lines[0] and "is gone" in lines[0]


def test_registering_a_name_another_run_just_created_succeeds(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    experiment = tracking.connect(uri, "e", (tmp_path / "a").as_uri())
    run = tracking.start_run(experiment, "x")
    MlflowClient(uri).create_registered_model("same-name")  # the other run won the race to create it
    assert tracking.register_adapter("same-name", f"runs:/{run}/adapter", run, tags={}) == 1
    assert tracking.register_adapter("new-name", f"runs:/{run}/adapter", run, tags={}) == 1


def test_ctrl_c_is_exit_130_and_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_config", lambda *a, **k: None)
    monkeypatch.setattr(cli, "run_workflow", interrupted)
    assert cli.main(["run", "x.yaml"]) == 130
    assert capsys.readouterr().err.strip().splitlines() == ["raypeft: interrupted"]


def test_a_stage_interrupted_ends_killed_and_the_state_stays_resumable(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C inside a stage (here: the trainer raises KeyboardInterrupt): both runs KILLED, and
    workflow.json left "running" with the stage's run, so the same command continues it."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = parse_config({"name": "ki", "output_dir": str(tmp_path / "out"), "tracking": {"uri": uri},
                        "eval": {"rouge": False}})

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(workflow, "preflight", lambda cfg, stages: {"sft": {"init": None}})
    monkeypatch.setattr(workflow.launcher, "init_ray", lambda: None)
    monkeypatch.setattr(workflow.launcher, "fit", interrupted)
    with pytest.raises(KeyboardInterrupt):
        workflow.run_workflow(cfg, log=lambda _: None)
    state = resume.load(cfg.output_path())
    assert state.status == resume.RUNNING and state.stages["sft"].status == resume.RUNNING
    client = MlflowClient(uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {r.info.status for r in runs} == {"KILLED"} and len(runs) == 2
    assert resume.resumable(state, resume.config_fingerprint(workflow._config_dict(cfg))) is not None
    assert os.path.exists(cfg.output_path() / resume.LOCK_FILE)
