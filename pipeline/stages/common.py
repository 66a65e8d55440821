"""What every stage's worker loop shares: batching, held-out ROUGE, resume, reports, final figures.

Kept apart from the stages so that each stage module only holds its own loss and metrics.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from pipeline import checkpoint, engine
from pipeline.config import RunConfig
from pipeline.evaluation import generate_responses, rouge_scores
from pipeline.resources import Throughput, worker_memory


def epoch_batches(n_rows: int, batch_size: int, worker: engine.Worker, seed: int, epoch: int) -> list[list[int]]:
    """This worker's batches of one epoch: a seeded shuffle shared by all, then rank-strided.

    Every worker gets the same number of batches (rows that do not fill a global batch are
    dropped), so collectives line up step by step.
    """
    order = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    per_step = batch_size * worker.world_size
    usable = (n_rows // per_step) * per_step
    mine = order[:usable][worker.rank::worker.world_size]
    return [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]


def total_steps(n_rows: int, batch_size: int, worker: engine.Worker, *, epochs: float, max_steps: int | None,
                batch_field: str) -> tuple[int, int]:
    """``(steps_per_epoch, total_steps)``; raises naming ``batch_field`` when a batch cannot be filled."""
    per_epoch = len(epoch_batches(n_rows, batch_size, worker, 0, 0))
    if per_epoch == 0:
        raise ValueError(f"{batch_field}: {n_rows} rows cannot fill one batch of {batch_size} "
                         f"on each of {worker.world_size} workers")
    return per_epoch, max_steps or max(1, math.ceil(per_epoch * epochs))


def held_out_rouge(model, tokenizer, rows, cfg: RunConfig, worker: engine.Worker) -> dict[str, float]:
    """ROUGE of greedy generations on the held-out SFT rows; each worker generates its shard."""
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


def latest_checkpoint() -> Path | None:
    """The checkpoint Ray Train hands a restarted worker group, copied to a local folder."""
    import ray.train

    ckpt = ray.train.get_checkpoint()
    if ckpt is None:
        return None
    local = Path(tempfile.mkdtemp(prefix="raypeft-resume-"))
    with ckpt.as_directory() as d:
        shutil.copytree(d, local, dirs_exist_ok=True)
    return local


def resume_folder(payload: dict[str, Any]) -> Path | None:
    """Where to resume from: ``payload["resume"]`` (a checkpoint folder) if given, else Ray's latest."""
    if payload.get("resume"):
        return Path(payload["resume"])
    return latest_checkpoint()


def report(worker: engine.Worker, metrics: dict, model, optimizer, scheduler, state) -> None:
    """Every worker reports; rank 0 attaches the checkpoint (Ray Train V2 wants equal report counts)."""
    if worker.is_main:
        checkpoint.report(metrics, model=model, optimizer=optimizer, scheduler=scheduler, state=state)
    else:
        checkpoint.report(metrics)


def resource_figures(worker: engine.Worker, throughput: Throughput) -> dict[str, float]:
    """Peak memory and tokens/s of every worker (``key/rank<i>``), plus the max / sum over workers."""
    per_worker = engine.all_gather({**worker_memory(worker.device), "tokens_per_s": throughput.overall()})
    out: dict[str, float] = {}
    for rank, figures in enumerate(per_worker):
        out.update({f"{k}/rank{rank}": v for k, v in figures.items()})
    out["peak_rss_mib"] = max(f["peak_rss_mib"] for f in per_worker)
    for key in ("peak_gpu_allocated_mib", "peak_gpu_reserved_mib"):
        if key in per_worker[0]:
            out[key] = max(f[key] for f in per_worker)
    out["tokens_per_s"] = sum(f["tokens_per_s"] for f in per_worker)
    return out


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
