"""The training backends for real: DeepSpeed ZeRO-3 with CPU offload vs plain PyTorch, in Ray Train.

Two gloo workers train the same LoRA on the same batches with both backends: the losses must
agree (ZeRO-3 partitions the base and the adapter but computes the same thing), the adapter
checkpoint must be the PEFT files gathered from the partitions, and a run restarted from a
checkpoint must continue with the optimiser state it had.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from ray import cloudpickle

from raypeft.pipeline.backends import fill_deepspeed_config, load_deepspeed_config, lr_lambda

REPO = Path(__file__).resolve().parents[2]
cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray workers cannot import test modules

STEPS = 4
ACCUM = 2


def test_fill_deepspeed_config_fills_auto_and_refuses_contradictions() -> None:
    ds = load_deepspeed_config(str(REPO / "configs" / "deepspeed" / "zero3_offload.json"))
    filled = fill_deepspeed_config(ds, micro_batch_size=4, grad_accum=2, world_size=3, max_grad_norm=1.0,
                                   dtype="bfloat16")
    assert filled["train_micro_batch_size_per_gpu"] == 4 and filled["gradient_accumulation_steps"] == 2
    assert filled["train_batch_size"] == 24 and filled["gradient_clipping"] == 1.0
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    assert filled["zero_optimization"]["offload_param"]["device"] == "cpu"
    with pytest.raises(ValueError, match="deepspeed.train_micro_batch_size_per_gpu: the file says 8"):
        fill_deepspeed_config({"train_micro_batch_size_per_gpu": 8}, micro_batch_size=4, grad_accum=1,
                              world_size=1, max_grad_norm=None, dtype="float32")
    with pytest.raises(FileNotFoundError):
        load_deepspeed_config("/no/such/ds.json")


def test_lr_schedule_shapes() -> None:
    cos = lr_lambda("cosine", 2, 10)
    assert [cos(0), cos(1)] == [0.5, 1.0] and cos(10) == pytest.approx(0.0) and cos(6) == pytest.approx(0.5)
    assert lr_lambda("linear", 0, 4)(2) == pytest.approx(0.5) and lr_lambda("constant", 0, 4)(3) == 1.0


def _loop(config: dict) -> None:
    import ray.train

    from raypeft.adapters import LoraConfig, get_adapter_model
    from raypeft.adapters.serialization import load_adapter_weights
    from raypeft.pipeline import engine
    from raypeft.pipeline.backends import build_backend, report_checkpoint
    from transformers import LlamaConfig, LlamaForCausalLM

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64))
    model = get_adapter_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                               init_lora_weights="gaussian"))
    backend = build_backend(model, deepspeed_config=config["ds"], micro_batch_size=2, grad_accum=ACCUM,
                            world_size=world, lr=5e-2, weight_decay=0.0, scheduler="linear", warmup_steps=1,
                            total_steps=STEPS, max_grad_norm=1.0, dtype="float32")
    state = {"step": 0}
    resume = ray.train.get_checkpoint()
    if resume is None and config["resume"]:
        resume = ray.train.Checkpoint(config["resume"])
    if resume is not None:
        with resume.as_directory() as d:
            state = backend.restore(Path(d), read_adapter=lambda p: model.load_adapter_state_dict(
                load_adapter_weights(p), "default"))
    losses = []
    for step in range(state["step"], config["stop_at"]):
        step_loss = 0.0
        for micro in range(ACCUM):
            gen = torch.Generator().manual_seed(10 * rank + micro)  # the same rows every step: loss must fall
            x = torch.randint(0, 128, (2, 12), generator=gen)
            loss = backend.module(input_ids=x, labels=x).loss / ACCUM
            backend.backward(loss)
            step_loss += loss.item()
        backend.step()
        losses.append(engine.all_reduce([step_loss])[0])
        state["step"] = step + 1
    metrics = {"losses": json.dumps(losses), "lr": backend.lr(), **backend.describe()}
    report_checkpoint(backend, metrics, is_main=rank == 0, state=dict(state),
                      write_adapter=lambda p: model.save_pretrained(str(p)))


def _fit(tmp: Path, name: str, ds: str | None, stop_at: int, resume=None):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(_loop, train_loop_config={"ds": ds, "stop_at": stop_at, "resume": resume},
                           scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
                           run_config=RunConfig(name=name, storage_path=str(tmp / "ray")))
    return trainer.fit()


@pytest.fixture()
def ray_local():
    from raypeft.pipeline.launcher import init_ray

    init_ray(num_cpus=2)
    yield
    import ray

    ray.shutdown()


@pytest.mark.slow
def test_zero3_offload_matches_torch_and_resumes(tmp_path: Path, ray_local) -> None:
    from raypeft.adapters.serialization import load_adapter_weights

    zero3 = str(REPO / "configs" / "deepspeed" / "zero3_offload.json")
    plain = _fit(tmp_path, "plain", None, STEPS)
    sharded = _fit(tmp_path, "zero3", zero3, STEPS)
    assert sharded.metrics["engine"] == "deepspeed" and sharded.metrics["zero_stage"] == 3
    assert sharded.metrics["offload_param"] == "cpu" and sharded.metrics["offload_optimizer"] == "cpu"
    plain_losses, sharded_losses = json.loads(plain.metrics["losses"]), json.loads(sharded.metrics["losses"])
    assert len(sharded_losses) == STEPS
    assert sharded_losses == pytest.approx(plain_losses, abs=1e-4)
    assert sharded_losses[-1] < sharded_losses[0]

    # The adapter was gathered from the ZeRO-3 partitions into PEFT files: full shapes, same values.
    with plain.checkpoint.as_directory() as a, sharded.checkpoint.as_directory() as b:
        wa, wb = load_adapter_weights(Path(a) / "adapter"), load_adapter_weights(Path(b) / "adapter")
        assert wa.keys() == wb.keys() and all(wa[k].shape == wb[k].shape for k in wa)
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4
        files = {p.name for p in (Path(b) / "deepspeed" / "state").iterdir()}
        assert sum("optim_states" in f for f in files) == 2  # one optimiser partition per rank
        model_states = [p for p in (Path(b) / "deepspeed" / "state").iterdir() if "model_states" in p.name]
        assert sum(p.stat().st_size for p in model_states) < 200_000  # the frozen base is not in it

    # Stop at step 2, resume from that checkpoint, finish: the same trajectory as uninterrupted.
    first = _fit(tmp_path, "zero3-part1", zero3, 2)
    second = _fit(tmp_path, "zero3-part2", zero3, STEPS, resume=first.checkpoint.path)
    resumed = json.loads(first.metrics["losses"]) + json.loads(second.metrics["losses"])
    assert resumed == pytest.approx(sharded_losses, abs=1e-4)
    assert second.metrics["lr"] == pytest.approx(sharded.metrics["lr"])
