"""The SFT stage for real: Ray Train (2 workers, gloo), the demo base, MLflow on SQLite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from mlflow import MlflowClient

from raypeft.adapters import AdapterModel
from raypeft.pipeline.config import load_config
from raypeft.pipeline.modeling import load_base_model
from raypeft.pipeline.tracking import resolve_adapter

REPO = Path(__file__).resolve().parents[2]

SMALL = [
    "stages=[sft]",  # quickstart.yaml is the whole sft -> reward -> ppo workflow
    "data.max_train_rows=64",
    "sft.max_steps=4",
    "sft.batch_size=8",
    "sft.log_every=1",
    "sft.checkpoint_every=2",
    "eval.max_rows=8",
    "eval.max_new_tokens=8",
    "scaling.num_workers=2",
]


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tmp_path


@pytest.fixture()
def ray_session():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.mark.slow
def test_sft_stage_trains_tracks_and_registers(workdir: Path, ray_session) -> None:
    from raypeft.pipeline.workflow import run_workflow

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    cfg = load_config(REPO / "configs" / "quickstart.yaml",
                      SMALL + [f"tracking.uri={uri}", f"output_dir={workdir / 'out'}", "name=itest"])
    (outcome,) = run_workflow(cfg)

    # The adapter folder is PEFT format and loads onto a fresh base.
    files = {p.name for p in outcome.adapter_dir.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert json.loads((outcome.adapter_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"
    base = load_base_model(cfg.model)
    loaded = AdapterModel.from_pretrained(base, str(outcome.adapter_dir))
    assert loaded.get_nb_trainable_parameters()[0] == 0  # inference mode: nothing trainable

    client = MlflowClient(uri)
    run = client.get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    parent_id = run.data.tags["mlflow.parentRunId"]
    assert client.get_run(parent_id).info.status == "FINISHED"
    metrics = run.data.metrics
    for key in ("train_loss", "tokens_per_s", "peak_rss_mib", "peak_rss_mib/rank0", "peak_rss_mib/rank1",
                "rougeL_before", "rougeL_after", "rouge1_after", "rouge2_after", "trainable_params",
                "total_params", "adapter_size_bytes"):
        assert key in metrics, key
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    assert metrics["adapter_size_bytes"] > 0
    losses = client.get_metric_history(outcome.run_id, "train_loss")
    assert sorted(m.step for m in losses) == [1, 2, 3, 4]
    assert run.data.params["adapter.r"] == "8"
    artifacts = {a.path for a in client.list_artifacts(outcome.run_id, "adapter")}
    assert "adapter/adapter_model.safetensors" in artifacts

    version = client.get_model_version("itest-sft", str(outcome.model_version))
    assert version.run_id == outcome.run_id
    assert version.tags["method"] == "lora" and version.tags["r"] == "8" and version.tags["stage"] == "sft"
    assert version.tags["base_model"] == "demo"
    resolved = resolve_adapter(f"models:/itest-sft/{outcome.model_version}", tracking_uri=uri)
    assert (resolved / "adapter_model.safetensors").read_bytes() == \
        (outcome.adapter_dir / "adapter_model.safetensors").read_bytes()

    # A second run continues from the registered adapter (the stage input as a models:/ URI).
    cfg2 = load_config(REPO / "configs" / "quickstart.yaml",
                       SMALL + [f"tracking.uri={uri}", f"output_dir={workdir / 'out2'}", "name=itest",
                                "sft.max_steps=2", "eval.rouge=false", "scaling.num_workers=1",
                                f"adapter.init_from=models:/itest-sft/{outcome.model_version}"])
    (second,) = run_workflow(cfg2)
    assert second.model_version == outcome.model_version + 1
    before = AdapterModel.from_pretrained(load_base_model(cfg.model), str(outcome.adapter_dir)).adapter_state_dict()
    after = AdapterModel.from_pretrained(load_base_model(cfg.model), str(second.adapter_dir)).adapter_state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "raypeft.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("override, expected", [
    ("adapter.r=0", "adapter.r: input should be greater than 0, got 0"),
    ("adapter.target_modules=[q_proj, nonexistent_proj]", "adapter.target_modules:"),
    ("data.source=/no/such/file.jsonl", "/no/such/file.jsonl"),
    ("data.columns.prompt=dialog", "dialog"),
    ("model.name_or_path=/no/such/model", "model.name_or_path:"),
    ("adapter.init_from=/no/such/adapter", "/no/such/adapter"),
])
def test_cli_bad_input_exits_2_with_one_line_and_writes_nothing(workdir: Path, override: str, expected: str) -> None:
    proc = _cli("run", str(REPO / "configs" / "quickstart.yaml"), "--set", override,
                "--set", f"output_dir={workdir / 'out'}", cwd=workdir)
    assert proc.returncode == 2, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("raypeft: error: ") and expected in line, proc.stderr
    assert not (workdir / "out").exists()


def test_cli_validate_accepts_quickstart(workdir: Path) -> None:
    proc = _cli("validate", str(REPO / "configs" / "quickstart.yaml"), cwd=workdir)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith(": ok")


def test_quickstart_yaml_is_the_demo() -> None:
    data = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    assert data["model"]["name_or_path"] == "demo" and data["data"]["source"] == "demo"


@pytest.mark.slow
def test_sft_stage_trains_a_seq2seq_model_from_local_files(workdir: Path, ray_session) -> None:
    """T5 (task_type SEQ_2_SEQ_LM) from a local folder, data from a local jsonl file, one worker."""
    from transformers import T5Config, T5ForConditionalGeneration

    from raypeft.pipeline.demo import DemoSettings
    from raypeft.pipeline.demo.corpus import generate_corpus
    from raypeft.pipeline.demo.tokenizer import train_tokenizer
    from raypeft.pipeline.workflow import run_workflow

    corpus = generate_corpus(DemoSettings.micro())
    tok = train_tokenizer(corpus.raw_documents, 400)
    torch.manual_seed(0)
    t5 = T5ForConditionalGeneration(T5Config(
        vocab_size=len(tok), d_model=32, d_ff=64, num_layers=2, num_heads=2, d_kv=16,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id))
    t5.save_pretrained(workdir / "t5")
    tok.save_pretrained(workdir / "t5")
    rows = workdir / "pairs.jsonl"
    rows.write_text("".join(json.dumps({"chat": r["dialogue"], "gist": r["summary"]}) + "\n"
                            for r in corpus.sft_train))

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [
        "stages=[sft]", f"model.name_or_path={workdir / 't5'}", "model.task_type=SEQ_2_SEQ_LM",
        f"data.source={rows}", "data.columns={prompt: chat, response: gist}", "data.eval_fraction=0.2",
        "adapter.target_modules=[q, v]", "sft.max_steps=3", "sft.batch_size=4", "sft.log_every=1",
        "eval.max_rows=4", "eval.max_new_tokens=4", "scaling.num_workers=1",
        f"tracking.uri={uri}", f"output_dir={workdir / 'out'}", "name=t5test",
    ])
    (outcome,) = run_workflow(cfg)
    saved = json.loads((outcome.adapter_dir / "adapter_config.json").read_text())
    assert saved["task_type"] == "SEQ_2_SEQ_LM" and sorted(saved["target_modules"]) == ["q", "v"]
    run = MlflowClient(uri).get_run(outcome.run_id)
    assert run.info.status == "FINISHED"
    assert {"train_loss", "rougeL_before", "rougeL_after"} <= set(run.data.metrics)
    assert [m.step for m in MlflowClient(uri).get_metric_history(outcome.run_id, "train_loss")] == [1, 2, 3]


@pytest.mark.slow
def test_qlora_sft_on_a_4bit_demo_base(workdir: Path, ray_session) -> None:
    """QLoRA through the whole stage on CPU: bitsandbytes NF4 base, LoRA in fp32, one worker."""
    import bitsandbytes as bnb

    from raypeft.pipeline.workflow import run_workflow

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    cfg = load_config(REPO / "configs" / "quickstart.yaml", SMALL + [
        "model.quantization={bits: 4, bnb_4bit_compute_dtype: float32}", "model.gradient_checkpointing=true",
        "scaling.num_workers=1", "sft.max_steps=3", "eval.rouge=false",
        f"tracking.uri={uri}", f"output_dir={workdir / 'out'}", "name=qlora"])
    (outcome,) = run_workflow(cfg)
    assert MlflowClient(uri).get_run(outcome.run_id).info.status == "FINISHED"
    base = load_base_model(cfg.model)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in base.modules())
    loaded = AdapterModel.from_pretrained(base, str(outcome.adapter_dir))
    with torch.no_grad():
        out = loaded(input_ids=torch.tensor([[1, 5, 9, 12]]))
    assert torch.isfinite(out.logits).all()
    # Only the adapter was written: a few hundred KiB, not the base.
    assert (outcome.adapter_dir / "adapter_model.safetensors").stat().st_size < 1_000_000
