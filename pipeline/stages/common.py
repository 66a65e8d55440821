"""What every stage's worker loop shares: batching, the training backend, held-out ROUGE,
resume, reports and final figures.

Kept apart from the stages so that each stage module only holds its own loss and metrics. Every
stage trains through one ``pipeline.backends.Backend`` (plain PyTorch, or DeepSpeed ZeRO-2/3 with
CPU offload when the YAML's ``deepspeed:`` names a config): its checkpoints and resumes go
through the backend too, so an adapter gathered from ZeRO-3 partitions and DeepSpeed's
per-rank optimiser partitions land in the same Ray Train checkpoint.

Under ZeRO-3 every forward gathers parameters collectively, so each worker must run as many
forwards (and ``generate`` calls) as the others: :func:`eval_shard` pads a worker's share of
held-out rows for that, and generation gets ``synced_gpus``.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import ray.train
import torch
from torch import nn

from raypeft.adapters.serialization import load_adapter_weights
from raypeft.pipeline import engine
from raypeft.pipeline.adapter_hooks import row_task_ids
from raypeft.pipeline.backends import Backend, build_backend, pad_for_lockstep, report_checkpoint
from raypeft.pipeline.config import ConfigError, RunConfig
from raypeft.pipeline.conversations import chat_tokenizer, is_chat, messages_column
from raypeft.pipeline.data.chat_rows import eval_prompts as chat_eval_prompts
from raypeft.pipeline.evaluation import generate_responses, rouge_scores
from raypeft.pipeline.resources import Throughput, worker_memory
from raypeft.pipeline.roles import Roles
from raypeft.pipeline.stages.definition import BatchShape


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


def require_batches(n_rows: int, batch_size: int, world_size: int, *, field: str, rows: str,
                    need: int = 1, need_why: str = "") -> None:
    """Refuse, on the driver, a batch size that leaves a worker fewer than ``need`` batches per
    epoch (``epoch_batches`` drops the rows that do not fill a global batch, so the workers' loop
    would otherwise find none, after Ray started and the earlier stages trained).

    ``rows`` names where the ``n_rows`` come from (``data.source``, ``ppo.data.source`` ...).
    """
    per_worker = n_rows // (batch_size * world_size)
    if per_worker < need:
        wanted = f"{need} batches ({need_why})" if need > 1 else "one batch"
        total = batch_size * world_size * need
        raise ConfigError(f"{field}: {batch_size} per worker x {world_size} workers needs {total} training rows "
                          f"for {wanted}; {rows} gives {n_rows}")


def total_steps(n_rows: int, batch_size: int, worker: engine.Worker, *, epochs: float, max_steps: int | None,
                batch_field: str) -> tuple[int, int]:
    """``(steps_per_epoch, total_steps)``; raises naming ``batch_field`` when a batch cannot be filled."""
    per_epoch = len(epoch_batches(n_rows, batch_size, worker, 0, 0))
    if per_epoch == 0:
        raise ValueError(f"{batch_field}: {n_rows} rows cannot fill one batch of {batch_size} "
                         f"on each of {worker.world_size} workers")
    return per_epoch, max_steps or max(1, math.ceil(per_epoch * epochs))


def eval_shard(n_rows: int, worker: engine.Worker, batch_size: int, backend: Backend | None) -> list[int | None]:
    """This worker's held-out row indices (rank-strided), padded with ``None`` to the busiest
    worker's batch count when the backend needs every worker in lockstep (ZeRO-3)."""
    mine: list[int | None] = list(range(worker.rank, n_rows, worker.world_size))
    return pad_for_lockstep(mine, batch_size, backend is not None and backend.lockstep, None)


def eval_prompts(cfg: RunConfig, tokenizer: Any, rows: Any) -> tuple[list[str], list[str], bool]:
    """``(prompt texts, references, add_special_tokens)`` of held-out SFT rows: the prompt template
    applied to the prompt column, or (``data.format: chat``) the conversation before its last
    assistant turn through the chat template's generation prompt, which writes its own specials."""
    if is_chat(cfg):
        texts, references = chat_eval_prompts(rows, chat_tokenizer(cfg, tokenizer),
                                              messages_column=messages_column(cfg, rows),
                                              prompt_column=cfg.data.columns.prompt,
                                              response_column=cfg.data.columns.response)
        return texts, references, False
    prompts = [cfg.data.prompt_template.format(prompt=p) for p in rows[cfg.data.columns.prompt]]
    return prompts, list(rows[cfg.data.columns.response]), True


def held_out_rouge(model, tokenizer, rows, cfg: RunConfig, worker: engine.Worker,
                   backend: Backend | None = None, rollout_engine: Any = None,
                   adapter: str | None = None) -> dict[str, float]:
    """ROUGE of greedy generations on the held-out SFT rows; each worker generates its shard
    (through ``rollout_engine`` with adapter ``adapter`` active, when given: the policy stages)."""
    prompts, references, specials = eval_prompts(cfg, tokenizer, rows)
    shard = eval_shard(len(prompts), worker, cfg.eval.batch_size, backend)
    task_ids = row_task_ids(model, cfg, rows)  # multitask prompt tuning: each row's task
    outputs = generate_responses(
        model, tokenizer, [prompts[i if i is not None else 0] for i in shard],
        max_new_tokens=cfg.eval.max_new_tokens, batch_size=cfg.eval.batch_size,
        is_seq2seq=cfg.model.task_type == "SEQ_2_SEQ_LM", device=worker.device,
        row_inputs=None if task_ids is None else {"task_ids": torch.tensor([task_ids[i or 0] for i in shard])},
        engine=rollout_engine, adapter=adapter, add_special_tokens=specials,
        **(backend.generate_kwargs() if backend is not None else {}),
    )
    mine = [i for i in shard if i is not None]
    outputs = [text for i, text in zip(shard, outputs) if i is not None]
    predictions: list[str] = [""] * len(prompts)
    for shard_ids, shard_out in zip(engine.all_gather(mine), engine.all_gather(outputs)):
        for i, text in zip(shard_ids, shard_out):
            predictions[i] = text
    return rouge_scores(predictions, references)


def latest_checkpoint() -> Path | None:
    """The checkpoint Ray Train hands a restarted worker group, copied to a local folder."""
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


GPU_PAD_MULTIPLE = 64


def auto_pad_multiple(device: torch.device) -> int | None:
    """What ``data.pad_to_multiple_of: auto`` means on ``device``: 64 on a GPU, none on CPU."""
    return GPU_PAD_MULTIPLE if device.type == "cuda" else None


def pad_multiple(cfg: RunConfig, worker: engine.Worker) -> int | None:
    """``data.pad_to_multiple_of`` for this worker's training batches (see :func:`auto_pad_multiple`)."""
    setting = cfg.data.pad_to_multiple_of
    return auto_pad_multiple(worker.device) if setting == "auto" else setting


def base_device(cfg: RunConfig, worker: engine.Worker) -> torch.device:
    """Where a worker loads the base: CPU under ZeRO-3 for a full-precision base, which the
    backend then partitions tensor by tensor (a GPU never holds it whole); else the worker's
    device (a bitsandbytes base is quantized on the device it loads on, and is small)."""
    ds = cfg.deepspeed_config()
    zero3 = ds is not None and ds.get("zero_optimization", {}).get("stage") == 3
    if zero3 and cfg.model.quantization is None:
        return torch.device("cpu")
    return worker.device


def make_backend(cfg: RunConfig, model: nn.Module, worker: engine.Worker, stage: str, batch: BatchShape, *,
                 total_steps: int, warmup_steps: int | None = None,
                 clip_groups: list[list[nn.Parameter]] | None = None) -> Backend:
    """The training backend the YAML asks for (``deepspeed:``), over the trainable parameters only.

    ``batch``: the stage's ``(micro-batch rows, micro-batches per step)`` (its ``Stage.batch``,
    which the driver checked against the DeepSpeed config). Learning rate, weight decay,
    schedule and clipping come from the stage's block; a ``Roles`` model computes its role
    outputs through the backend's module from here on (one engine).
    """
    spec = getattr(cfg, stage)
    micro, accum = batch
    backend = build_backend(
        model, deepspeed_config=cfg.deepspeed_config(), micro_batch_size=micro, grad_accum=accum,
        world_size=worker.world_size, lr=spec.learning_rate, weight_decay=spec.weight_decay,
        scheduler=spec.lr_scheduler, warmup_steps=spec.warmup_steps if warmup_steps is None else warmup_steps,
        total_steps=total_steps, max_grad_norm=spec.max_grad_norm, dtype=cfg.model.dtype, clip_groups=clip_groups,
    )
    if isinstance(model, Roles):
        model.attach_entry(backend.module)
    return backend


def count_parameters(params: Iterable[nn.Parameter]) -> int:
    """Element count of ``params``, whole even when ZeRO-3 has partitioned them."""
    return sum(int(getattr(p, "ds_numel", p.numel())) for p in params)


def _adapter_io(model: nn.Module) -> tuple[Callable[[Path], None], Callable[[Path], None]]:
    """How a checkpoint's ``adapter/`` folder is written and read for this model (roles: the
    primary role there, any other trained role beside it under ``roles/``)."""
    if isinstance(model, Roles):
        return (lambda d: model.save_trainables(d.parent, d.name),
                lambda d: model.load_trainables(d.parent, d.name))
    name = getattr(model, "active_adapter", "default")
    return (lambda d: model.save_pretrained(str(d)),
            lambda d: model.load_adapter_state_dict(load_adapter_weights(d), name))


def restore(backend: Backend, folder: Path, model: nn.Module) -> dict[str, Any]:
    """Adapter, optimiser, schedule and step from a checkpoint folder; returns the stage state."""
    return backend.restore(folder, read_adapter=_adapter_io(model)[1])


def report(worker: engine.Worker, backend: Backend, metrics: dict, model: nn.Module, state: dict[str, Any]) -> None:
    """Every worker reports (Ray Train V2 wants equal report counts) and saves its part of the
    checkpoint: rank 0 the adapter, gathered from ZeRO-3 partitions; under DeepSpeed every rank
    its optimiser partition."""
    report_checkpoint(backend, metrics, is_main=worker.is_main, write_adapter=_adapter_io(model)[0],
                      state=dict(state))


def resource_figures(worker: engine.Worker, throughput: Throughput, backend: Backend | None = None) -> dict[str, float]:
    """Peak memory and tokens/s of every worker (``key/rank<i>``), the max (memory) and sum
    (tokens/s) over workers, tokens/s per worker, and the engine's ZeRO stage under DeepSpeed."""
    per_worker = engine.all_gather({**worker_memory(worker.device), "tokens_per_s": throughput.overall()})
    out: dict[str, float] = {}
    for rank, figures in enumerate(per_worker):
        out.update({f"{k}/rank{rank}": v for k, v in figures.items()})
    out["peak_rss_mib"] = max(f["peak_rss_mib"] for f in per_worker)
    for key in ("peak_gpu_allocated_mib", "peak_gpu_reserved_mib"):
        if key in per_worker[0]:
            out[key] = max(f[key] for f in per_worker)
    out["tokens_per_s"] = sum(f["tokens_per_s"] for f in per_worker)
    out["tokens_per_s_per_worker"] = out["tokens_per_s"] / len(per_worker)
    out["workers"] = float(len(per_worker))
    if backend is not None and "zero_stage" in backend.describe():
        out["zero_stage"] = float(backend.describe()["zero_stage"])
    return out


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
