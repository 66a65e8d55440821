"""Virtual-token methods through the whole SFT stage: Ray Train, MLflow, registry, PEFT files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow import MlflowClient

from raypeft.adapters import AdapterModel
from raypeft.pipeline.config import load_config
from raypeft.pipeline.modeling import load_base_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def ray_session():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.mark.slow
@pytest.mark.parametrize("method, peft_type, workers, extra", [
    ("prefix", "PREFIX_TUNING", 2, "prefix_projection: true, encoder_hidden_size: 32"),
    ("prompt", "PROMPT_TUNING", 1, "prompt_tuning_init: TEXT, prompt_tuning_init_text: 'Summary of the chat'"),
    ("ptuning", "P_TUNING", 1, "encoder_reparameterization_type: LSTM, encoder_hidden_size: 32"),
])
def test_virtual_token_sft_trains_tracks_and_registers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ray_session,
                                                       method: str, peft_type: str, workers: int, extra: str) -> None:
    from raypeft.pipeline.workflow import run_workflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [
        "stages=[sft]", f"adapter={{method: {method}, num_virtual_tokens: 6, {extra}}}",
        "data.max_train_rows=64", "sft.max_steps=3", "sft.batch_size=8", "sft.log_every=1",
        "sft.learning_rate=0.01", "eval.max_rows=6", "eval.max_new_tokens=6", f"scaling.num_workers={workers}",
        f"tracking.uri={uri}", f"output_dir={tmp_path / 'out'}", f"name=vt-{method}",
    ])
    (outcome,) = run_workflow(cfg)

    saved = json.loads((outcome.adapter_dir / "adapter_config.json").read_text())
    assert saved["peft_type"] == peft_type and saved["num_virtual_tokens"] == 6
    loaded = AdapterModel.from_pretrained(load_base_model(cfg.model), str(outcome.adapter_dir))
    assert loaded.active_peft_config.peft_type == peft_type

    client = MlflowClient(uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert {"rougeL_before", "rougeL_after", "adapter_size_bytes", "trainable_params"} <= set(m)
    assert [x.step for x in client.get_metric_history(outcome.run_id, "train_loss")] == [1, 2, 3]
    version = client.get_model_version(f"vt-{method}-sft", str(outcome.model_version))
    assert version.tags["method"] == method and version.tags["num_virtual_tokens"] == "6"
    assert "r" not in version.tags
