"""What the two preference-pair stages (reward, DPO) set up alike before their loops differ.

Both read ``{prompt, chosen, rejected}`` rows, format them like SFT rows, shard the same epochs
over the workers, wrap their roles in one Backend and resume from the same checkpoint layout;
only the loss and the metrics differ. Keeping the setup here keeps the two stages' step
accounting (and so their resume behaviour) identical; their batch shape and driver-side data
check are here for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raypeft.pipeline import engine
from raypeft.pipeline.backends import Backend
from raypeft.pipeline.config import PairColumns, RunConfig
from raypeft.pipeline.conversations import chat_tokenizer, is_chat
from raypeft.pipeline.data import PairCollator, tokenize_pairs
from raypeft.pipeline.data.chat_rows import tokenize_chat_pairs
from raypeft.pipeline.data.packing import PackedPairCollator
from raypeft.pipeline.inputs import pair_rows
from raypeft.pipeline.preflight_checks import Warn, report_truncation
from raypeft.pipeline.roles import Roles
from raypeft.pipeline.stages import common
from raypeft.pipeline.stages.definition import BatchShape


def tokenized_pairs(cfg: RunConfig, rows, tokenizer, columns: PairColumns, field: str = "reward.data"):
    """Pairs formatted like SFT rows: ``data.prompt_template``, ``data.max_length``, eos appended;
    or (``data.format: chat``) through the chat template, the loss mask on each side's last reply."""
    if is_chat(cfg):
        prompt = columns.prompt if columns.prompt in rows.column_names else None
        return tokenize_chat_pairs(rows, chat_tokenizer(cfg, tokenizer, f"{field}.columns"), prompt_column=prompt,
                                   chosen_column=columns.chosen, rejected_column=columns.rejected,
                                   max_length=cfg.data.max_length, truncation=cfg.data.truncation,
                                   field=f"{field}.columns")
    return tokenize_pairs(rows, tokenizer, prompt_column=columns.prompt, chosen_column=columns.chosen,
                          rejected_column=columns.rejected, prompt_template=cfg.data.prompt_template,
                          max_length=cfg.data.max_length, truncation=cfg.data.truncation)


def batch_shape(spec: Any) -> BatchShape:
    """``spec.batch_size`` pairs per worker, one optimiser step each."""
    return spec.batch_size, 1


def check_pair_data(cfg: RunConfig, stage: str, spec: Any, tokenizer: Any, warn: Warn) -> None:
    """The stage's pairs and their columns (``<stage>.data``); pairs over ``data.max_length``
    refused (``data.truncation: error``) or counted in a warning."""
    field = f"{stage}.data"
    train, _ = pair_rows(cfg, spec.data, field)
    rows, report = tokenized_pairs(cfg, train, tokenizer, spec.data.columns, field)
    report_truncation(f"{field}.source", report.truncated, report.rows, cfg.data.max_length, warn,
                      report.responses_cut)
    common.require_batches(len(rows), spec.batch_size, cfg.scaling.num_workers, field=f"{stage}.batch_size",
                           rows=f"{field}.source (after the held-out pairs)")


@dataclass
class PairTraining:
    train_set: Any
    eval_set: Any
    collate: PairCollator | PackedPairCollator
    steps_per_epoch: int
    total: int
    backend: Backend
    state: dict[str, Any]
    first_metrics: dict[str, float]


def prepare(cfg: RunConfig, stage: str, spec: Any, roles: Roles, tokenizer, worker: engine.Worker,
            payload: dict[str, Any]) -> PairTraining:
    """Tokenized train/held-out pairs, the step budget, the Backend, and the state to start from
    (step 0, or the latest checkpoint's when Ray Train restarted the run)."""
    train_rows, held_out = pair_rows(cfg, spec.data, f"{stage}.data")
    train_set, truncation = tokenized_pairs(cfg, train_rows, tokenizer, spec.data.columns, f"{stage}.data")
    eval_set, _ = tokenized_pairs(cfg, held_out, tokenizer, spec.data.columns, f"{stage}.data")
    steps_per_epoch, total = common.total_steps(len(train_set), spec.batch_size, worker, epochs=spec.epochs,
                                                max_steps=spec.max_steps, batch_field=f"{stage}.batch_size")
    n_train = common.count_parameters(roles.trainable_parameters())
    backend = common.make_backend(cfg, roles, worker, stage, batch_shape(spec), total_steps=total)
    state: dict[str, Any] = {"step": 0}
    resumed = common.resume_folder(payload)
    if resumed is not None:
        state = common.restore(backend, resumed, roles)
        engine.say(f"[{stage}] resumed from step {state['step']}")
    first = {"trainable_params": n_train, "train_pairs": len(train_set), "eval_pairs": len(eval_set),
             "truncated_pairs": truncation.truncated}
    collate = pair_collator(cfg, tokenizer, common.pad_multiple(cfg, worker))
    return PairTraining(train_set, eval_set, collate, steps_per_epoch, total, backend, state, first)


def pair_collator(cfg: RunConfig, tokenizer, multiple: int | None) -> PairCollator | PackedPairCollator:
    """Padded pairs, or (``data.packing``) the ``2B`` sides in bins of ``data.max_length`` tokens
    with no attention across sides; both stages reduce either back to one figure per side. Widths
    rounded up to ``multiple`` (``data.pad_to_multiple_of``)."""
    if cfg.data.packing:
        return PackedPairCollator(max_tokens=cfg.data.max_length, pad_token_id=tokenizer.pad_token_id,
                                  pad_to_multiple_of=multiple)
    return PairCollator(pad_token_id=tokenizer.pad_token_id, pad_to_multiple_of=multiple)
