"""Issue 19, class 5: the driver is SIGKILLed mid-stage and the same command is run again.

``raypeft run`` of sft -> reward in a subprocess; once the reward stage has reported a
checkpoint the driver gets SIGKILL (no handler runs: the MLflow runs stay RUNNING and
``workflow.json`` says "running"). The same command again must skip SFT (finished, adapter
unchanged, and say so), continue the reward stage in its own MLflow run from its last checkpoint
(not from step 0), and end every run FINISHED; the first SFT version stays the only one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


@pytest.mark.slow
def test_sigkilled_driver_rerun_skips_finished_stages_and_resumes_the_interrupted_one(tmp_path: Path) -> None:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    sets = ["stages=[sft,reward]", "data.max_train_rows=64", "sft.max_steps=4", "sft.batch_size=8",
            "reward.max_steps=40", "reward.batch_size=4", "reward.checkpoint_every=2", "reward.log_every=2",
            "reward.data.max_train_rows=64", "reward.data.max_eval_rows=8", "eval.rouge=false",
            "scaling.num_workers=1", f"tracking.uri={uri}", f"output_dir={tmp_path / 'out'}", "name=crash"]
    cmd = [sys.executable, "-m", "raypeft", "run", QUICKSTART] + [a for s in sets for a in ("--set", s)]
    env = {**os.environ, "RAY_ADDRESS": "local"}
    out = tmp_path / "out" / "crash"

    with open(tmp_path / "first.log", "w") as log:
        driver = subprocess.Popen(cmd, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 480
        while not list((out / "ray").glob("reward-*/checkpoint_*")):
            assert driver.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()
            time.sleep(1)
        time.sleep(3)  # a few more reward steps
        driver.send_signal(signal.SIGKILL)
        driver.wait(60)
    state = json.loads((out / "workflow.json").read_text())
    assert state["status"] == "running"
    assert state["stages"]["sft"]["status"] == "finished" and state["stages"]["reward"]["status"] == "running"
    reward_run = state["stages"]["reward"]["run_id"]
    client = MlflowClient(uri)
    assert client.get_run(reward_run).info.status == "RUNNING"  # a SIGKILLed driver closes nothing

    again = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=540)
    text = again.stdout + again.stderr
    assert again.returncode == 0, text
    assert "stage sft: finished in an earlier attempt" in text and "skipped" in text
    assert f"stage reward: resuming MLflow run {reward_run} from its last checkpoint" in text
    resumed = [int(line.rsplit(" ", 1)[-1]) for line in text.splitlines() if "[reward] resumed from step" in line]
    assert resumed and resumed[0] >= 2, text  # from a checkpoint, not from step 0

    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {r.info.status for r in runs} == {"FINISHED"} and len(runs) == 3, [(r.info.run_name, r.info.status)
                                                                              for r in runs]
    steps = [m.step for m in client.get_metric_history(reward_run, "train_loss")]
    assert len(steps) == len(set(steps)) and max(steps) == 40  # every step once, in the one reward run
    assert [int(v.version) for v in client.search_model_versions("name = 'crash-sft'")] == [1]
    assert json.loads((out / "workflow.json").read_text())["status"] == "finished"
