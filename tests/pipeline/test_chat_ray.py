"""Every stage on conversational rows, for real: one workflow sft -> reward -> dpo -> ppo -> grpo
on the demo's rows in chat form (``data.format: chat``), through Ray Train, MLflow on SQLite.

One workflow, tiny step counts, one worker: the plumbing of each stage on conversations (rows
rendered through the demo's chat template, the SFT loss packed, held-out ROUGE through the
generation prompt, pairs scored on their last reply, rollouts continuing the generation prompt,
GRPO's prompts split off the SFT conversations with their last reply as a reward function's reference),
not learning; the quickstart-chat figures are in the README.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from mlflow import MlflowClient

from raypeft.pipeline.config import load_config

REPO = Path(__file__).resolve().parents[2]

TINY = [
    "stages=[sft,reward,dpo,ppo,grpo]", "data.format=chat", "data.packing=true", "data.max_train_rows=32",
    "scaling.num_workers=1", "sft.max_steps=2", "sft.batch_size=8", "sft.log_every=1",
    "eval.max_rows=4", "eval.max_new_tokens=4", "eval.batch_size=4",
    "reward.max_steps=2", "reward.batch_size=4", "reward.log_every=1", "reward.data.max_train_rows=16",
    "reward.data.max_eval_rows=8",
    "dpo.max_steps=2", "dpo.chunked_loss=true", "dpo.batch_size=4", "dpo.log_every=1", "dpo.data.max_train_rows=16", "dpo.data.max_eval_rows=8",
    "ppo.max_steps=1", "ppo.rollout_batch_size=4", "ppo.ppo_epochs=1", "ppo.generation.max_new_tokens=6",
    "ppo.eval_prompts=4", "ppo.data.max_rows=12",
    "grpo.max_steps=1", "grpo.num_generations=2", "grpo.prompts_per_step=2", "grpo.generation.max_new_tokens=6",
    "grpo.eval_prompts=4", "grpo.data.max_rows=12",
    # GRPO from the SFT conversations (prompt before the last reply; the reply as the reference), scored by
    # the reward model and a reward function reading that reference
    "grpo.data.source=sft", "grpo.data.column=dialogue",
    "grpo.rewards=[{function: rouge_l, weight: 1.0, kwargs: {reference_column: summary}}]",
]


@pytest.mark.slow
def test_every_stage_runs_on_conversations(tmp_path: Path) -> None:
    import ray

    from raypeft.pipeline.workflow import run_workflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cfg = load_config(REPO / "configs" / "quickstart-grpo-rm.yaml", TINY + [
        f"tracking.uri={uri}", f"tracking.artifact_location={(tmp_path / 'art').as_uri()}",
        f"output_dir={tmp_path / 'out'}", "name=chatrun"])
    try:
        outcomes = {o.stage: o for o in run_workflow(cfg, log=lambda _: None)}
    finally:
        if ray.is_initialized():
            ray.shutdown()
    assert list(outcomes) == ["sft", "reward", "dpo", "ppo", "grpo"]
    client = MlflowClient(uri)
    metrics = {stage: client.get_run(o.run_id).data.metrics for stage, o in outcomes.items()}
    for stage, o in outcomes.items():
        assert client.get_run(o.run_id).info.status == "FINISHED", stage
    expected = {"sft": ("train_loss", "rougeL_before", "rougeL_after"),
                "reward": ("train_loss", "eval_accuracy_before", "eval_accuracy_after"),
                "dpo": ("train_loss", "eval_accuracy_after"),
                "ppo": ("eval_reward_before", "eval_reward_after", "eval_kl_after", "rougeL_after"),
                "grpo": ("eval_reward_before", "eval_reward_after", "rougeL_after", "reward/rouge_l/mean")}
    for stage, keys in expected.items():
        for key in keys:
            assert key in metrics[stage] and math.isfinite(metrics[stage][key]), (stage, key)
    # packed SFT: one padding-free row per micro-batch of 8 conversations, all tokens real
    assert metrics["sft"]["train_rows"] == 32
    assert metrics["dpo"]["chunked_loss"] == 1.0  # packed pairs, response positions projected in chunks
    for stage in outcomes:
        assert (cfg.output_path() / stage / "adapter" / "adapter_model.safetensors").is_file(), stage
