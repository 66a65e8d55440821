"""Reward model: an adapter plus a scalar value head, trained on preference pairs.

Loss: Bradley-Terry, ``-log sigmoid(r(chosen) - r(rejected))``, where ``r`` is the value head
on the final hidden state at the last non-padding token of ``prompt + response + eos``. One
forward scores both sides (a ``PairCollator`` batch holds the B chosen rows, then the B
rejected). Metrics: train loss / accuracy / margin per logging window, and held-out pair
accuracy, margin and loss before training, every ``eval_every`` steps and after.

The published adapter folder holds the PEFT adapter plus ``value_head.safetensors``
(``pipeline.roles``); the PPO stage loads it as its reward role.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from raypeft.pipeline import compilation, engine, nonfinite_loss, tracking
from raypeft.pipeline.backends import Backend
from raypeft.pipeline.config import RewardSpec, RunConfig
from raypeft.pipeline.data import PairCollator, count_tokens, split_pairs
from raypeft.pipeline.data.packing import PackedPairCollator, at_ends
from raypeft.pipeline.modeling import adapter_config, load_base_model, load_tokenizer
from raypeft.pipeline.preflight_checks import Warn
from raypeft.pipeline.resources import Throughput, reset_gpu_peaks
from raypeft.pipeline.rl_math import bradley_terry_loss
from raypeft.pipeline.roles import Roles, has_value_head
from raypeft.pipeline.stages import common, pairs
from raypeft.pipeline.stages.definition import AdapterInput, BatchShape, Stage, before_after

NAME = "reward"
ROLE = "reward"


def build_roles(cfg: RunConfig, base: torch.nn.Module, init_dir: str | None) -> Roles:
    """The reward role on ``base``: continued from ``init_dir`` (e.g. the SFT adapter) or fresh."""
    roles = Roles(base)
    if init_dir is not None:
        roles.add(ROLE, init_dir, trainable=True, value_head="file" if has_value_head(init_dir) else "zero")
    else:
        roles.add(ROLE, adapter_config(cfg.adapter, cfg.model), trainable=True, value_head="zero")
    return roles


def pair_scores(roles: Roles, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores of the chosen and rejected sides: the value head at each side's last token."""
    if "ends" in batch:  # packed (data.packing): each side ends somewhere inside a bin
        values = roles.values(ROLE, batch["input_ids"], None, position_ids=batch["position_ids"])
        return split_pairs(at_ends(values, batch["ends"]))
    return split_pairs(roles.scores(ROLE, batch["input_ids"], batch["attention_mask"]))


@torch.no_grad()
def evaluate(roles: Roles, dataset, collate: PairCollator | PackedPairCollator, worker: engine.Worker,
             batch_size: int, backend: Backend | None = None) -> dict[str, float]:
    """Held-out pair accuracy (ties count as wrong), mean margin and loss; rows sharded over workers
    (padded rows, which keep ZeRO-3 workers in lockstep, are scored and left out)."""
    roles.eval()
    sums = [0.0, 0.0, 0.0, 0.0]  # correct, margin, loss, rows
    shard = common.eval_shard(len(dataset), worker, batch_size, backend)
    for i in range(0, len(shard), batch_size):
        ids = shard[i:i + batch_size]
        batch = common.to_device(collate([dataset[j if j is not None else 0] for j in ids]), worker.device)
        chosen, rejected = pair_scores(roles, batch)
        keep = torch.tensor([j is not None for j in ids], device=chosen.device)
        margin = (chosen - rejected)[keep]
        sums[0] += (margin > 0).float().sum().item()
        sums[1] += margin.sum().item()
        sums[2] += -torch.nn.functional.logsigmoid(margin).sum().item()
        sums[3] += len(margin)
    correct, margin, loss, n = engine.all_reduce(sums, op="sum")
    roles.train()
    n = max(n, 1.0)
    return {"eval_accuracy": correct / n, "eval_margin": margin / n, "eval_loss": loss / n}


def train_loop(payload: dict[str, Any]) -> None:
    cfg = RunConfig.model_validate(payload["config"])
    spec = cfg.reward
    worker = engine.setup_worker(cfg)
    logger = tracking.RunLogger(payload["tracking_uri"], payload["run_id"], enabled=worker.is_main)
    reset_gpu_peaks(worker.device)

    tokenizer = load_tokenizer(cfg.model)
    base = load_base_model(cfg.model, common.base_device(cfg, worker))
    roles = build_roles(cfg, base, payload["inputs"].get("init"))
    setup = pairs.prepare(cfg, NAME, spec, roles, tokenizer, worker, payload)
    train_set, eval_set, collate, backend, state = (setup.train_set, setup.eval_set, setup.collate,
                                                    setup.backend, setup.state)
    steps_per_epoch, total = setup.steps_per_epoch, setup.total
    if worker.is_main:
        logger.log(setup.first_metrics, step=0)
    if "eval_before" not in state:
        state["eval_before"] = evaluate(roles, eval_set, collate, worker, spec.batch_size * 2, backend)
        logger.log(state["eval_before"], step=0)

    roles.train()
    throughput = Throughput()
    started = time.perf_counter()
    window: list[list[float]] = []
    step = state["step"]
    with compilation.compiled(backend.module, spec.compile):
        while step < total:
            epoch, within = divmod(step, steps_per_epoch)
            for ids in common.epoch_batches(len(train_set), spec.batch_size, worker, cfg.seed, epoch)[within:]:
                batch = common.to_device(collate([train_set[j] for j in ids]), worker.device)
                chosen, rejected = pair_scores(roles, batch)
                loss = bradley_terry_loss(chosen, rejected)
                nonfinite_loss.check_finite(loss, stage=NAME, step=step + 1)
                backend.backward(loss)
                backend.step()
                margin = (chosen - rejected).detach()
                window.append([loss.item(), (margin > 0).float().mean().item(), margin.mean().item()])
                throughput.add(count_tokens(batch))
                step += 1
                state["step"] = step

                if step % spec.log_every == 0 or step == total:
                    means = [sum(col) / len(col) for col in zip(*window)]
                    loss_m, acc_m, margin_m, tok_s = engine.all_reduce(means + [throughput.window()], op="mean")
                    window = []
                    logger.log({"train_loss": loss_m, "train_accuracy": acc_m, "train_margin": margin_m,
                                "learning_rate": backend.lr(),
                                "tokens_per_s": tok_s * worker.world_size, "epoch": step / steps_per_epoch}, step=step)
                    if worker.is_main:
                        engine.say(f"[reward] step {step}/{total} loss {loss_m:.4f} acc {acc_m:.3f} "
                                   f"margin {margin_m:.3f}")
                if spec.eval_every and step % spec.eval_every == 0 and step < total:
                    logger.log(evaluate(roles, eval_set, collate, worker, spec.batch_size * 2, backend), step=step)
                if step % spec.checkpoint_every == 0 and step < total:
                    logger.flush()
                    common.report(worker, backend, {"step": step}, roles, state)
                if step >= total:
                    break

    final: dict[str, float] = {"train_seconds": time.perf_counter() - started}
    after = evaluate(roles, eval_set, collate, worker, spec.batch_size * 2, backend)
    logger.log(after, step=step)
    final.update({f"{k}_after": v for k, v in after.items()})
    final.update({f"{k}_before": v for k, v in state["eval_before"].items()})
    final.update(common.resource_figures(worker, throughput, backend))
    if worker.is_main:
        engine.say(f"[reward] held-out accuracy {state['eval_before']['eval_accuracy']:.3f} -> "
                   f"{after['eval_accuracy']:.3f}, margin {after['eval_margin']:.3f}")
    logger.log(final, step=step)
    logger.flush()
    common.report(worker, backend, {"step": step, "done": 1, **final}, roles, state)


# ------------------------------------------------------------------------------- driver side

def batch_shape(cfg: RunConfig) -> BatchShape:
    return pairs.batch_shape(cfg.reward)


def check_data(cfg: RunConfig, tokenizer: Any, warn: Warn) -> None:
    pairs.check_pair_data(cfg, NAME, cfg.reward, tokenizer, warn)


STAGE = Stage(
    name=NAME, section=RewardSpec, train_loop=train_loop, inputs=(AdapterInput("init", "reward.init_from"),),
    batch=batch_shape, check_data=check_data, summary_metrics=("eval_accuracy", "eval_margin"),
    metrics=("train_loss", "train_accuracy", "train_margin", "epoch", "train_pairs", "eval_pairs", "truncated_pairs")
    + before_after("eval_accuracy", "eval_margin", "eval_loss"),
)
