"""Issue 19, class 1: a sweep whose metric its stage never logs is refused before any trial
trains (it used to train every trial and then fail)."""

from __future__ import annotations

from pathlib import Path

import pytest

from raypeft.cli import main
from raypeft.pipeline.stages.registry import stage_named
from raypeft.tune.metric_names import check_metric
from raypeft.tune.schema import SweepError

REPO = Path(__file__).resolve().parents[2]

CASES = [  # (field, metric, stage, expected error or None)
    ("metric", "rougeL_after", "sft", None),
    ("metric", "train_loss", "sft", None),
    ("metric", "eval_accuracy_after", "reward", None),
    ("metric", "eval_reward_after", "ppo", None),
    ("metric", "eval_reward/rouge_l", "grpo", None),        # per reward function: open-ended
    ("metric", "peak_rss_mib/rank0", "dpo", None),
    ("metric", "rougel_after", "sft",
     r"metric: the sft stage logs no metric 'rougel_after'; did you mean 'rougeL_after'\?"),
    ("metric", "eval_accuracy_after", "sft",
     r"metric: 'eval_accuracy_after' is logged by the reward stage, not by sft"),
    ("metric", "rougeL_after", "reward", r"metric: 'rougeL_after' is logged by the sft stage, not by reward"),
    ("scheduler.metric", "train_loss", "ppo",
     r"scheduler\.metric: 'train_loss' is logged by the sft stage, not by ppo"),
    ("metric", "accuracy", "sft", r"metric: the sft stage logs no metric 'accuracy'"),
    ("metric", "eval_rewrd_after", "grpo", r"did you mean 'eval_reward_after'\?"),
]


@pytest.mark.parametrize("field,metric,stage,expect", CASES)
def test_sweep_metric_is_one_the_stage_logs(field: str, metric: str, stage: str, expect: str | None) -> None:
    if expect is None:
        check_metric(field, metric, stage)
    else:
        with pytest.raises(SweepError, match=expect):
            check_metric(field, metric, stage)


def test_the_summary_metrics_are_among_the_logged_ones() -> None:
    """What ``raypeft run`` prints (prefixes) must name metrics the stage declares it logs."""
    for name in ("sft", "reward", "dpo", "ppo", "grpo"):
        stage = stage_named(name)
        for prefix in stage.summary_metrics:
            assert any(m.startswith(prefix) for m in stage.logged_metrics()), (name, prefix)


def test_the_cli_refuses_it_before_anything_starts(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    rc = main(["sweep", str(REPO / "configs" / "sweep-quickstart.yaml"), "--set", "metric=rouge_l_after"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("raypeft: error: metric: the sft stage logs no metric 'rouge_l_after'; did you mean")
    assert list(tmp_path.iterdir()) == []
