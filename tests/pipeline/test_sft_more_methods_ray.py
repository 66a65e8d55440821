"""The rest of the PEFT family through the whole SFT stage, in one Ray session: IA3, LoHa, AdaLoRA
(rank allocation driven by the loop, 2 workers), bottleneck adapters and multitask prompt tuning
(task ids from a data column, in training and in the held-out generation)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from raypeft.adapters import AdapterModel
from raypeft.pipeline.config import load_config
from raypeft.pipeline.modeling import load_base_model

REPO = Path(__file__).resolve().parents[2]

SMALL = ["stages=[sft]", "data.max_train_rows=48", "sft.max_steps=4", "sft.batch_size=8", "sft.log_every=1",
         "sft.checkpoint_every=100", "eval.max_rows=6", "eval.max_new_tokens=6", "scaling.num_workers=1"]

# method -> (adapter block, extra overrides, peft_type, registry tags)
CASES = {
    "ia3": ("{method: ia3}", ["sft.learning_rate=0.05"], "IA3", {"method": "ia3"}),
    "loha": ("{method: loha, r: 4, alpha: 8}", [], "LOHA", {"method": "loha", "r": "4"}),
    "adalora": ("{method: adalora, init_r: 4, target_r: 2, tfinal: 1, target_modules: [q_proj, v_proj]}",
                ["scaling.num_workers=2"], "ADALORA", {"method": "adalora", "init_r": "4", "target_r": "2"}),
    "bottleneck": ("{method: bottleneck, bottleneck_size: 16}", [], "BOTTLENECK",
                   {"method": "bottleneck", "placement": "houlsby", "bottleneck_size": "16"}),
    "multitask_prompt": ("{method: multitask_prompt, num_virtual_tokens: 4, num_tasks: 2, num_ranks: 2}",
                         ["data.columns.task_id=task", "sft.learning_rate=0.05"], "MULTITASK_PROMPT_TUNING",
                         {"method": "multitask_prompt", "num_tasks": "2"}),
}


@pytest.fixture()
def ray_session():
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


def _task_files(folder: Path) -> list[str]:
    """The demo's SFT rows with a ``task`` column (row parity), as train and eval files."""
    from raypeft.pipeline.demo import ensure_demo_assets

    data = ensure_demo_assets().data_dir
    out = []
    for name, count in (("sft_train.jsonl", 48), ("sft_eval.jsonl", 6)):
        rows = [json.loads(line) for line in (data / name).read_text().splitlines()[:count]]
        path = folder / f"task_{name}"
        path.write_text("".join(json.dumps({**r, "task": i % 2}) + "\n" for i, r in enumerate(rows)))
        out.append(str(path))
    return out


@pytest.mark.slow
def test_more_methods_train_track_and_register(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ray_session) -> None:
    from raypeft.pipeline.workflow import run_workflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    train_file, eval_file = _task_files(tmp_path)
    client = MlflowClient(uri)
    base = load_base_model(load_config(REPO / "configs" / "quickstart.yaml").model)
    for method, (block, extra, peft_type, tags) in CASES.items():
        data = [f"data.source={train_file}", f"data.eval_source={eval_file}"] if method == "multitask_prompt" else []
        cfg = load_config(REPO / "configs" / "quickstart.yaml", SMALL + extra + data + [
            f"adapter={block}", f"tracking.uri={uri}", f"output_dir={tmp_path / 'out'}", f"name=more-{method}"])
        (outcome,) = run_workflow(cfg)

        saved = json.loads((outcome.adapter_dir / "adapter_config.json").read_text())
        assert saved["peft_type"] == peft_type, method
        loaded = AdapterModel.from_pretrained(_fresh(base), str(outcome.adapter_dir))
        assert loaded.active_peft_config.peft_type == peft_type
        run = client.get_run(outcome.run_id)
        assert run.info.status == "FINISHED", method
        m = run.data.metrics
        assert {"rougeL_before", "rougeL_after", "adapter_size_bytes", "trainable_params"} <= set(m), method
        assert [x.step for x in client.get_metric_history(outcome.run_id, "train_loss")] == [1, 2, 3, 4]
        version = client.get_model_version(f"more-{method}-sft", str(outcome.model_version))
        assert {k: version.tags[k] for k in tags} == tags, method
        _check_method(method, saved, loaded, base, m)


def _fresh(base):
    import copy

    return copy.deepcopy(base)


def _check_method(method: str, saved: dict, loaded, base, metrics: dict) -> None:
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        reference = base(input_ids=ids).logits
        if method == "multitask_prompt":
            outputs = [loaded(input_ids=ids, task_ids=torch.tensor([t])).logits[:, 4:] for t in (0, 1)]
            assert (outputs[0] - outputs[1]).abs().max() > 1e-4  # both tasks trained, each its own prompt
            return
        adapted = loaded(input_ids=ids).logits
    assert (adapted - reference).abs().max() > 1e-4, method  # training moved the model
    if method == "adalora":
        # the loop ran the allocator: total_step is the stage's 4 steps, the final pattern keeps
        # target_r triplets per module on average, and the file holds only those
        assert saved["total_step"] == 4 and saved["rank_pattern"]
        kept = [sum(mask) for mask in saved["rank_pattern"].values()]
        assert sum(kept) == 2 * len(kept)
        assert metrics["trainable_params"] > 0
