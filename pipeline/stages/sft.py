"""Supervised fine-tuning: causal-LM (or seq2seq) loss on response tokens only.

``train_loop`` runs inside every Ray Train worker: it loads the shared base, puts the adapter
on it, trains the adapter through the stage's backend (plain PyTorch with gradients averaged
over workers, or DeepSpeed ZeRO-2/3 with CPU offload: ``deepspeed:`` in the YAML), measures
ROUGE on the held-out split before and after (generation sharded over the workers), and reports
adapter-only checkpoints. The driver side (MLflow run, trainer, registration) is shared by all
stages: ``pipeline.workflow``; the loop's plumbing by all loops: ``pipeline.stages.common``.
"""

from __future__ import annotations

import math
import time
from typing import Any

from raypeft.pipeline import compilation, engine, lm_head_loss, nonfinite_loss, tracking
from raypeft.pipeline.adapter_hooks import adapter_hooks
from raypeft.pipeline.config import RunConfig, SFTSpec
from raypeft.pipeline.conversations import chat_tokenizer, is_chat, messages_column
from raypeft.pipeline.data import SFTCollator, count_tokens, tokenize_sft
from raypeft.pipeline.data.chat_rows import tokenize_chat_sft
from raypeft.pipeline.data.packing import PackedSFTCollator
from raypeft.pipeline.inputs import sft_rows
from raypeft.pipeline.lm_head_loss import causal_lm_loss
from raypeft.pipeline.modeling import attach_adapter, load_base_model, load_tokenizer
from raypeft.pipeline.preflight_checks import Warn, report_truncation
from raypeft.pipeline.resources import Throughput, reset_gpu_peaks
from raypeft.pipeline.stages import common
from raypeft.pipeline.stages.definition import ROUGE_METRICS, AdapterInput, BatchShape, Stage

NAME = "sft"


def tokenized_sft(cfg: RunConfig, rows: Any, tokenizer: Any):
    """``(tokenized rows, truncation report)`` of SFT rows, with the ``data`` block's settings:
    the same on the driver (row-length check) as in the workers."""
    if is_chat(cfg):
        return tokenize_chat_sft(rows, chat_tokenizer(cfg, tokenizer), messages_column=messages_column(cfg, rows),
                                 prompt_column=cfg.data.columns.prompt, response_column=cfg.data.columns.response,
                                 max_length=cfg.data.max_length, train_on=cfg.data.train_on,
                                 truncation=cfg.data.truncation)
    return tokenize_sft(rows, tokenizer, prompt_column=cfg.data.columns.prompt,
                        response_column=cfg.data.columns.response, prompt_template=cfg.data.prompt_template,
                        max_length=cfg.data.max_length, is_seq2seq=cfg.model.task_type == "SEQ_2_SEQ_LM",
                        truncation=cfg.data.truncation)


def train_loop(payload: dict[str, Any]) -> None:
    cfg = RunConfig.model_validate(payload["config"])
    worker = engine.setup_worker(cfg)
    logger = tracking.RunLogger(payload["tracking_uri"], payload["run_id"], enabled=worker.is_main)
    reset_gpu_peaks(worker.device)

    tokenizer = load_tokenizer(cfg.model)
    model = attach_adapter(load_base_model(cfg.model, common.base_device(cfg, worker)), cfg.adapter, cfg.model,
                           init_dir=payload.get("init_adapter"))
    train_rows, held_out = sft_rows(cfg)
    train_set, truncation = tokenized_sft(cfg, train_rows, tokenizer)
    # Packed: a micro-batch's rows side by side in bins of data.max_length tokens (pipeline/data/packing.py).
    multiple = common.pad_multiple(cfg, worker)
    collate = PackedSFTCollator(max_tokens=cfg.data.max_length, pad_token_id=tokenizer.pad_token_id,
                                pad_to_multiple_of=multiple) if cfg.data.packing \
        else SFTCollator(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=multiple)

    s = cfg.sft
    micro_per_epoch = len(common.epoch_batches(len(train_set), s.batch_size, worker, cfg.seed, 0))
    if micro_per_epoch < s.grad_accum:
        raise ValueError(f"sft.batch_size: {len(train_set)} rows give {micro_per_epoch} batches per worker, "
                         f"fewer than grad_accum={s.grad_accum}")
    steps_per_epoch = micro_per_epoch // s.grad_accum
    total_steps = s.max_steps or max(1, math.ceil(steps_per_epoch * s.epochs))

    # Counted before the backend exists: ZeRO-3 partitions every tensor when it takes the model.
    n_train, n_total = model.get_nb_trainable_parameters()
    backend = common.make_backend(cfg, model, worker, NAME, batch_shape(cfg), total_steps=total_steps)
    hooks = adapter_hooks(model, cfg, total_steps=total_steps, train_rows=train_rows)  # AdaLoRA, task ids

    state: dict[str, Any] = {"step": 0}
    resumed = common.resume_folder(payload)
    if resumed is not None:
        state = common.restore(backend, resumed, model)
        engine.say(f"[sft] resumed from step {state['step']}")

    if worker.is_main:
        logger.log({"trainable_params": n_train, "total_params": n_total, "train_rows": len(train_set),
                    "truncated_rows": truncation.truncated}, step=0)
    if cfg.eval.rouge and "rouge_before" not in state:
        state["rouge_before"] = common.held_out_rouge(model, tokenizer, held_out, cfg, worker, backend)
        logger.log({f"{k}_before": v for k, v in state["rouge_before"].items()}, step=0)

    chunked = lm_head_loss.enabled(s.chunked_loss, model, worker.device)  # labelled positions only, in chunks
    if worker.is_main:
        logger.log({"chunked_loss": float(chunked)}, step=0)
    model.train()
    throughput = Throughput()
    started = time.perf_counter()
    loss_window: list[float] = []
    step = state["step"]
    with compilation.compiled(backend.module, s.compile):
        while step < total_steps:
            epoch, within = divmod(step, steps_per_epoch)
            batches = common.epoch_batches(len(train_set), s.batch_size, worker, cfg.seed, epoch)
            for group_start in range(within * s.grad_accum, steps_per_epoch * s.grad_accum, s.grad_accum):
                group = batches[group_start:group_start + s.grad_accum]
                for ids in group:
                    rows = [train_set[j] for j in ids]
                    batch = common.to_device(collate(rows), worker.device)
                    inputs = {**batch, **hooks.inputs(ids)}
                    loss = causal_lm_loss(backend.module, inputs) if chunked else backend.module(**inputs).loss
                    loss = (loss + hooks.loss_extra()) / len(group)
                    nonfinite_loss.check_finite(loss, stage=NAME, step=step + 1)
                    backend.backward(loss)
                    loss_window.append(loss.item() * len(group))
                    # packed bins carry no attention mask to count by: count the rows' own tokens
                    throughput.add(sum(len(r["input_ids"]) for r in rows) if cfg.data.packing else count_tokens(batch))
                hooks.before_step(step)
                backend.step()
                hooks.after_step(step)
                step += 1
                state["step"] = step

                if step % s.log_every == 0 or step == total_steps:
                    loss_mean, tok_s = engine.all_reduce([sum(loss_window) / len(loss_window), throughput.window()],
                                                         op="mean")
                    loss_window = []
                    logger.log({"train_loss": loss_mean, "learning_rate": backend.lr(),
                                "tokens_per_s": tok_s * worker.world_size, "epoch": step / steps_per_epoch}, step=step)
                    if worker.is_main:
                        engine.say(f"[sft] step {step}/{total_steps} loss {loss_mean:.4f} "
                                   f"lr {backend.lr():.2e} tokens/s {tok_s * worker.world_size:.0f}")
                if step % s.checkpoint_every == 0 and step < total_steps:
                    logger.flush()
                    common.report(worker, backend, {"step": step}, model, state)
                if step >= total_steps:
                    break

    final: dict[str, float] = {"train_seconds": time.perf_counter() - started}
    if cfg.eval.rouge:
        after = common.held_out_rouge(model, tokenizer, held_out, cfg, worker, backend)
        final.update({f"{k}_after": v for k, v in after.items()})
        final.update({f"{k}_before": v for k, v in state["rouge_before"].items()})
    final.update(common.resource_figures(worker, throughput, backend))
    logger.log(final, step=step)
    logger.flush()
    common.report(worker, backend, {"step": step, "done": 1, **final}, model, state)


# ------------------------------------------------------------------------------- driver side

def batch_shape(cfg: RunConfig) -> BatchShape:
    return cfg.sft.batch_size, cfg.sft.grad_accum


def check_data(cfg: RunConfig, tokenizer: Any, warn: Warn) -> None:
    """The SFT rows and their columns; rows over ``data.max_length`` refused (``data.truncation:
    error``) or counted in a warning."""
    train, held_out = sft_rows(cfg)
    rows, report = tokenized_sft(cfg, train, tokenizer)
    report_truncation("data.source", report.truncated, report.rows, cfg.data.max_length, warn, report.responses_cut,
                      **({"cut": "conversations keep their first max_length tokens"} if is_chat(cfg) else {}))
    common.require_batches(len(rows), cfg.sft.batch_size, cfg.scaling.num_workers, field="sft.batch_size",
                           rows="data.source (after the held-out rows)", need=cfg.sft.grad_accum,
                           need_why=f"sft.grad_accum={cfg.sft.grad_accum}")
    if is_chat(cfg) and cfg.eval.rouge:  # the held-out conversations are rendered for ROUGE in every worker
        common.eval_prompts(cfg, tokenizer, held_out)


STAGE = Stage(
    name=NAME, section=SFTSpec, train_loop=train_loop, inputs=(AdapterInput("init", "adapter.init_from"),),
    batch=batch_shape, check_data=check_data, summary_metrics=("rouge",), causal_lm_only=False,
    metrics=ROUGE_METRICS + ("train_loss", "epoch", "train_rows", "truncated_rows", "chunked_loss"),
)
