"""``raypeft eval CONFIG --adapter REF``: score one adapter on the config's held-out data.

``REF`` is anything a stage input may be (a folder, ``models:/NAME@ALIAS``,
``models:/NAME/VERSION``, ``runs:/...``). An adapter with a value head (a reward model) is
scored by pair accuracy, margin and loss on the reward stage's held-out pairs; any other
adapter by ROUGE-1/2/L/Lsum of greedy generations on the SFT held-out rows, with the
config's ``eval`` settings. The same functions as the stages measure it, in this process,
without Ray: one model, a few hundred rows.
"""

from __future__ import annotations

from pathlib import Path

import torch

from raypeft.adapters import AdapterModel
from raypeft.pipeline import engine, tracking
from raypeft.pipeline.adapter_files import check_weights_file
from raypeft.pipeline.config import ConfigError, RunConfig
from raypeft.pipeline.data import PairCollator
from raypeft.pipeline.inputs import pair_rows, sft_rows
from raypeft.pipeline.modeling import load_base_model, load_tokenizer
from raypeft.pipeline.preflight_checks import probe_tracking
from raypeft.pipeline.roles import has_value_head
from raypeft.pipeline.stages import common, pairs, reward


def evaluate_adapter(cfg: RunConfig, ref: str, *, device: str | None = None) -> tuple[Path, dict[str, float]]:
    """``(local adapter folder, metrics)`` of ``ref`` on ``cfg``'s base model and held-out data."""
    with tracking.quiet_mlflow():
        if tracking.is_registry_uri(ref):
            probe_tracking(cfg.tracking_uri(), write=False)  # a missing store is an error, not created
        folder = tracking.resolve_adapter(ref, tracking_uri=cfg.tracking_uri())
    check_weights_file(folder, f"--adapter {ref}")
    dev = torch.device(device or ("cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu"))
    engine.quiet_libraries()
    worker = engine.Worker(rank=0, world_size=1, device=dev)
    tokenizer = load_tokenizer(cfg.model)
    base = load_base_model(cfg.model, dev)
    is_reward = has_value_head(folder)
    try:
        if is_reward:
            model = reward.build_roles(cfg, base, str(folder))
        else:
            model = AdapterModel.from_pretrained(base, str(folder))
    except (ValueError, RuntimeError, KeyError, FileNotFoundError) as exc:
        raise ConfigError(f"--adapter {ref}: cannot load it onto {cfg.model.name_or_path}: "
                          f"{str(exc).splitlines()[0]}") from None
    if is_reward:
        _, held_out = pair_rows(cfg, cfg.reward.data, "reward.data")
        eval_set, _ = pairs.tokenized_pairs(cfg, held_out, tokenizer, cfg.reward.data.columns)
        collate = PairCollator(pad_token_id=tokenizer.pad_token_id)
        metrics = reward.evaluate(model, eval_set, collate, worker, cfg.reward.batch_size * 2)
        return folder, {**metrics, "eval_pairs": float(len(eval_set))}
    _, held_out = sft_rows(cfg)
    metrics = common.held_out_rouge(model, tokenizer, held_out, cfg, worker)
    return folder, {**metrics, "eval_rows": float(len(held_out))}
