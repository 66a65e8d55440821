"""Supervised fine-tuning: causal-LM (or seq2seq) loss on response tokens only.

``train_loop`` runs inside every Ray Train worker: it loads the shared base, puts the adapter
on it, trains with DDP over the adapter's parameters, measures ROUGE on the held-out split
before and after (generation sharded over the workers), and reports adapter-only checkpoints.
The driver side (MLflow run, trainer, registration) is shared by all stages: ``pipeline.workflow``.
"""

from __future__ import annotations

import math
import shutil
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from pipeline import checkpoint, engine, tracking
from pipeline.config import RunConfig
from pipeline.data import SFTCollator, count_tokens, tokenize_sft
from pipeline.evaluation import generate_responses, rouge_scores
from pipeline.inputs import sft_rows
from pipeline.modeling import attach_adapter, load_base_model, load_tokenizer
from pipeline.resources import Throughput, reset_gpu_peaks, worker_memory

STAGE = "sft"


# ------------------------------------------------------------------------------- worker

def _held_out_rouge(model, tokenizer, rows, cfg: RunConfig, worker: engine.Worker) -> dict[str, float]:
    """ROUGE of greedy generations on the held-out rows; each worker generates its shard."""
    prompts = [cfg.data.prompt_template.format(prompt=p) for p in rows[cfg.data.columns.prompt]]
    references = list(rows[cfg.data.columns.response])
    mine = list(range(worker.rank, len(prompts), worker.world_size))
    outputs = generate_responses(
        model, tokenizer, [prompts[i] for i in mine],
        max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
        is_seq2seq=cfg.model.task_type == "SEQ_2_SEQ_LM", device=worker.device,
    )
    predictions: list[str] = [""] * len(prompts)
    for shard_ids, shard_out in zip(engine.all_gather(mine), engine.all_gather(outputs)):
        for i, text in zip(shard_ids, shard_out):
            predictions[i] = text
    return rouge_scores(predictions, references)


def _batches(n_rows: int, batch_size: int, worker: engine.Worker, seed: int, epoch: int) -> list[list[int]]:
    """This worker's batches of one epoch: a seeded shuffle shared by all, then rank-strided."""
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    per_step = batch_size * worker.world_size
    usable = (n_rows // per_step) * per_step
    mine = order[:usable][worker.rank::worker.world_size]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def train_loop(payload: dict[str, Any]) -> None:
    cfg = RunConfig.model_validate(payload["config"])
    worker = engine.setup_worker(cfg)
    logger = tracking.RunLogger(payload["tracking_uri"], payload["run_id"], enabled=worker.is_main)
    reset_gpu_peaks(worker.device)

    tokenizer = load_tokenizer(cfg.model)
    model = attach_adapter(load_base_model(cfg.model, worker.device), cfg.adapter, cfg.model,
                           init_dir=payload.get("init_adapter"))
    train_rows, held_out = sft_rows(cfg)
    train_set, truncation = tokenize_sft(
        train_rows, tokenizer, prompt_column=cfg.data.columns.prompt, response_column=cfg.data.columns.response,
        prompt_template=cfg.data.prompt_template, max_length=cfg.data.max_length,
        is_seq2seq=cfg.model.task_type == "SEQ_2_SEQ_LM", truncation=cfg.data.truncation,
    )
    collate = SFTCollator(pad_token_id=tokenizer.pad_token_id)

    s = cfg.sft
    micro_per_epoch = len(_batches(len(train_set), s.batch_size, worker, cfg.seed, 0))
    if micro_per_epoch < s.grad_accum:
        raise ValueError(f"sft.batch_size: {len(train_set)} rows give {micro_per_epoch} batches per worker, "
                         f"fewer than grad_accum={s.grad_accum}")
    steps_per_epoch = micro_per_epoch // s.grad_accum
    total_steps = s.max_steps or max(1, math.ceil(steps_per_epoch * s.epochs))

    ddp_model = engine.wrap_ddp(model, worker)
    optimizer = engine.make_optimizer(model, s.learning_rate, s.weight_decay)
    scheduler = engine.make_scheduler(optimizer, s.lr_scheduler, s.warmup_steps, total_steps)

    state: dict[str, Any] = {"step": 0}
    resumed = payload.get("resume") or _latest_checkpoint()
    if resumed is not None:
        state = checkpoint.restore(resumed, model, optimizer, scheduler)
        engine.say(f"[sft] resumed from step {state['step']}")

    if worker.is_main:
        n_train, n_total = model.get_nb_trainable_parameters()
        logger.log({"trainable_params": n_train, "total_params": n_total, "train_rows": len(train_set),
                    "truncated_rows": truncation.truncated}, step=0)
    if cfg.eval.rouge and "rouge_before" not in state:
        state["rouge_before"] = _held_out_rouge(model, tokenizer, held_out, cfg, worker)
        logger.log({f"{k}_before": v for k, v in state["rouge_before"].items()}, step=0)

    model.train()
    throughput = Throughput()
    started = time.perf_counter()
    loss_window: list[float] = []
    step = state["step"]
    while step < total_steps:
        epoch, within = divmod(step, steps_per_epoch)
        batches = _batches(len(train_set), s.batch_size, worker, cfg.seed, epoch)
        for group_start in range(within * s.grad_accum, steps_per_epoch * s.grad_accum, s.grad_accum):
            group = batches[group_start:group_start + s.grad_accum]
            for i, ids in enumerate(group):
                batch = {k: v.to(worker.device) for k, v in collate([train_set[j] for j in ids]).items()}
                sync = i == len(group) - 1
                ctx = ddp_model.no_sync() if (not sync and hasattr(ddp_model, "no_sync")) else nullcontext()
                with ctx:
                    loss = ddp_model(**batch).loss / len(group)
                    loss.backward()
                loss_window.append(loss.item() * len(group))
                throughput.add(count_tokens(batch))
            if s.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], s.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            state["step"] = step

            if step % s.log_every == 0 or step == total_steps:
                loss_mean, tok_s = engine.all_reduce([sum(loss_window) / len(loss_window), throughput.window()],
                                                     op="mean")
                loss_window = []
                logger.log({"train_loss": loss_mean, "learning_rate": scheduler.get_last_lr()[0],
                            "tokens_per_s": tok_s * worker.world_size, "epoch": step / steps_per_epoch}, step=step)
                if worker.is_main:
                    engine.say(f"[sft] step {step}/{total_steps} loss {loss_mean:.4f} "
                          f"lr {scheduler.get_last_lr()[0]:.2e} tokens/s {tok_s * worker.world_size:.0f}")
            if step % s.checkpoint_every == 0 and step < total_steps:
                logger.flush()
                _report(worker, {"step": step}, model, optimizer, scheduler, state)
            if step >= total_steps:
                break

    train_seconds = time.perf_counter() - started
    final: dict[str, float] = {"train_seconds": train_seconds}
    if cfg.eval.rouge:
        after = _held_out_rouge(model, tokenizer, held_out, cfg, worker)
        final.update({f"{k}_after": v for k, v in after.items()})
        final.update({f"{k}_before": v for k, v in state["rouge_before"].items()})
    per_worker = engine.all_gather({**worker_memory(worker.device), "tokens_per_s": throughput.overall()})
    for rank, figures in enumerate(per_worker):
        final.update({f"{k}/rank{rank}": v for k, v in figures.items()})
    final["peak_rss_mib"] = max(f["peak_rss_mib"] for f in per_worker)
    for key in ("peak_gpu_allocated_mib", "peak_gpu_reserved_mib"):
        if key in per_worker[0]:
            final[key] = max(f[key] for f in per_worker)
    final["tokens_per_s"] = sum(f["tokens_per_s"] for f in per_worker)
    logger.log(final, step=step)
    logger.flush()
    _report(worker, {"step": step, "done": 1, **final}, model, optimizer, scheduler, state)


def _latest_checkpoint() -> Path | None:
    """The checkpoint Ray Train hands a restarted worker group, copied to a local folder."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    local = Path(tempfile.mkdtemp(prefix="raypeft-resume-"))
    with ckpt.as_directory() as d:
        shutil.copytree(d, local, dirs_exist_ok=True)
    return local


def _report(worker: engine.Worker, metrics: dict, model, optimizer, scheduler, state) -> None:
    if worker.is_main:
        checkpoint.report(metrics, model=model, optimizer=optimizer, scheduler=scheduler, state=state)
    else:
        checkpoint.report(metrics)
