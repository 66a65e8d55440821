"""What a stage reads: the YAML's data block turned into checked train and eval rows.

The same function runs on the driver (so a missing file or column fails before Ray starts)
and in each worker (which loads its own copy instead of shipping rows through the object
store; the Hugging Face datasets cache makes the second load cheap).
"""

from __future__ import annotations

from datasets import Dataset

from pipeline.config import RunConfig
from pipeline.data import check_columns, load_rows, split_train_eval

DEMO_SOURCE = "demo"


def sft_rows(cfg: RunConfig) -> tuple[Dataset, Dataset]:
    """Train and held-out rows with the prompt/response columns the YAML names."""
    data = cfg.data
    trust = cfg.model.trust_remote_code
    if data.source == DEMO_SOURCE:
        from pipeline.demo import ensure_demo_assets

        files = ensure_demo_assets().data_dir
        train = load_rows(str(files / "sft_train.jsonl"))
        held_out = load_rows(str(files / "sft_eval.jsonl"))
    else:
        train = load_rows(data.source, split=data.train_split, file_format=data.file_format,
                          subset=data.subset, trust_remote_code=trust)
        if data.eval_source:
            held_out = load_rows(data.eval_source, split=data.eval_split or "train",
                                 file_format=data.file_format, subset=data.subset, trust_remote_code=trust)
        elif data.eval_split:
            held_out = load_rows(data.source, split=data.eval_split, file_format=data.file_format,
                                 subset=data.subset, trust_remote_code=trust)
        else:
            train, held_out = split_train_eval(train, eval_fraction=data.eval_fraction or 0.05,
                                               eval_rows=None, seed=cfg.seed)
    required = {"prompt": data.columns.prompt, "response": data.columns.response}
    check_columns(train, required, where="data.source")
    check_columns(held_out, required, where="data.eval_source" if data.eval_source else "data.source")
    if data.max_train_rows is not None and len(train) > data.max_train_rows:
        train = train.select(range(data.max_train_rows))
    if cfg.eval.max_rows is not None and len(held_out) > cfg.eval.max_rows:
        held_out = held_out.select(range(cfg.eval.max_rows))
    return train, held_out
