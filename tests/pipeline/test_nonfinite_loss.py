"""The non-finite loss stop without Ray: the verdict, the wrapper that turns it into a clean stop, and
the driver-side error naming the step and the last good checkpoint (the Ray run is in
``test_bad_input.py``, marked slow)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import ray.train
import torch

from raypeft.pipeline import nonfinite_loss


@pytest.mark.parametrize("loss", [torch.tensor(1.5), 0.25, torch.tensor([0.1, 2.0])])
def test_finite_losses_pass(loss) -> None:
    nonfinite_loss.check_finite(loss, stage="sft", step=3)


@pytest.mark.parametrize("loss, kind", [(torch.tensor(float("nan")), "nan"), (float("inf"), "inf"),
                                        (torch.tensor([1.0, float("-inf")]), "inf"),
                                        (torch.tensor([float("nan"), float("inf")]), "nan")])
def test_nan_and_inf_stop_with_the_step(loss, kind: str) -> None:
    with pytest.raises(nonfinite_loss.NonFiniteLoss, match=rf"^reward: loss is {kind} at step 7; the stage stopped before "
                                                   "applying that update$"):
        nonfinite_loss.check_finite(loss, stage="reward", step=7)


def test_wrapper_leaves_a_verdict_and_returns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ray.train, "get_context", lambda: SimpleNamespace(get_world_rank=lambda: 0))
    verdict = tmp_path / "run" / "nonfinite.json"

    def loop(payload: dict) -> None:
        nonfinite_loss.check_finite(torch.tensor(float("nan")), stage="dpo", step=4)

    assert nonfinite_loss.stop_on_nonfinite(loop)({nonfinite_loss.STOP_FILE: str(verdict)}) is None  # no exception: no retry
    assert json.loads(verdict.read_text()) == {"stage": "dpo", "step": 4, "kind": "nan"}

    ckpt = tmp_path / "checkpoint_000002"
    ckpt.mkdir()
    (ckpt / "checkpoint.json").write_text(json.dumps({"step": 3, "complete": True}))
    result = SimpleNamespace(checkpoint=SimpleNamespace(path=str(ckpt)), metrics={"step": 3})
    with pytest.raises(nonfinite_loss.NonFiniteLoss, match=rf"^dpo: loss is nan at step 4; .*last good checkpoint "
                                                   rf"\(step 3\): {ckpt} \(lower the learning rate"):
        nonfinite_loss.raise_if_stopped(result, verdict)


def test_other_errors_pass_through_and_a_clean_run_is_returned(tmp_path: Path) -> None:
    def loop(payload: dict) -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError):
        nonfinite_loss.stop_on_nonfinite(loop)({nonfinite_loss.STOP_FILE: str(tmp_path / "v.json")})
    result = SimpleNamespace(checkpoint=None, metrics={})
    assert nonfinite_loss.raise_if_stopped(result, tmp_path / "v.json") is result


def test_non_finite_loss_survives_pickling() -> None:
    """Ray ships a worker's exception to the driver by pickle: the step and kind must come back."""
    import pickle

    from raypeft.pipeline.nonfinite_loss import NonFiniteLoss

    again = pickle.loads(pickle.dumps(NonFiniteLoss("sft", 7, "inf", "; last good checkpoint: x")))
    assert (again.stage, again.step, again.kind) == ("sft", 7, "inf")
    assert str(again) == "sft: loss is inf at step 7; the stage stopped before applying that update; last good checkpoint: x"
