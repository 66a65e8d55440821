"""What a stage reads: the YAML's data block turned into checked train and eval rows.

The same function runs on the driver (so a missing file or column fails before Ray starts)
and in each worker (which loads its own copy instead of shipping rows through the object
store; the Hugging Face datasets cache makes the second load cheap).
"""

from __future__ import annotations

from datasets import Dataset

from raypeft.pipeline.config import PairDataSpec, PromptDataSpec, RunConfig
from raypeft.pipeline.data import DataError, check_columns, load_rows, split_train_eval
from raypeft.pipeline.demo import as_conversation, as_prompt_conversation, ensure_demo_assets

DEMO_SOURCE = "demo"


def _demo_conversations(rows: Dataset) -> Dataset:
    """The demo's dialogue/summary rows as ``{"messages": [system, user, assistant]}`` rows.

    Mapped with a fingerprint of our own: ``Dataset.from_list`` would hash the new table with
    dill, which in a Ray worker prints a disassembly of datasets' pickling helper to the log."""
    return rows.map(lambda row: as_conversation(row["dialogue"], row["summary"]), remove_columns=rows.column_names,
                    keep_in_memory=True, load_from_cache_file=False, new_fingerprint=f"{rows._fingerprint}-chat",
                    desc="demo conversations")


def _demo_prompt_conversations(rows: Dataset, column: str) -> Dataset:
    """The demo's ``column`` of dialogues as ``[system, user]`` conversations (pairs and prompts)."""
    return rows.map(lambda row: {column: as_prompt_conversation(row[column])}, keep_in_memory=True,
                    load_from_cache_file=False, new_fingerprint=f"{rows._fingerprint}-chat-{column}",
                    desc="demo conversations")


def sft_rows(cfg: RunConfig) -> tuple[Dataset, Dataset]:
    """Train and held-out rows with the columns the YAML names: prompt/response text, or with
    ``data.format: chat`` a messages column (or prompt/response message lists)."""
    data = cfg.data
    trust = cfg.model.trust_remote_code
    chat = data.format == "chat"
    if data.source == DEMO_SOURCE:
        files = ensure_demo_assets().data_dir
        train = load_rows(str(files / "sft_train.jsonl"))
        held_out = load_rows(str(files / "sft_eval.jsonl"))
        if chat:
            train, held_out = _demo_conversations(train), _demo_conversations(held_out)
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
    if chat and data.columns.messages in train.column_names:
        required = {"messages": data.columns.messages}
    if data.columns.task_id is not None:  # multitask prompt tuning
        required["task_id"] = data.columns.task_id
    check_columns(train, required, where="data.source")
    check_columns(held_out, required, where="data.eval_source" if data.eval_source else "data.source")
    if data.max_train_rows is not None and len(train) > data.max_train_rows:
        train = train.select(range(data.max_train_rows))
    if cfg.eval.max_rows is not None and len(held_out) > cfg.eval.max_rows:
        held_out = held_out.select(range(cfg.eval.max_rows))
    return train, held_out


def _require_columns(ds: Dataset, required: dict[str, str], field: str, place: str) -> None:
    """Like ``check_columns`` but naming the stage's own field (``reward.data.columns.chosen``)."""
    for role, column in required.items():
        if column not in ds.column_names:
            raise DataError(f"{field}.{role}: column '{column}' not found in {place}; "
                            f"present: {', '.join(ds.column_names)}")


def pair_rows(cfg: RunConfig, spec: PairDataSpec, field: str) -> tuple[Dataset, Dataset]:
    """Train and held-out preference pairs for the reward or DPO stage (``field``: its data block).
    With ``data.format: chat`` the prompt column may be absent: chosen and rejected are then whole
    conversations."""
    trust = cfg.model.trust_remote_code
    where = f"{field}.source"
    if spec.source == DEMO_SOURCE:
        files = ensure_demo_assets().data_dir
        train = load_rows(str(files / "preference_train.jsonl"), where=where)
        held_out = load_rows(str(files / "preference_eval.jsonl"), where=where)
        if cfg.data.format == "chat":
            train, held_out = (_demo_prompt_conversations(d, "prompt") for d in (train, held_out))
    else:
        train = load_rows(spec.source, split=spec.train_split, file_format=spec.file_format, subset=spec.subset,
                          trust_remote_code=trust, where=where)
        if spec.eval_source:
            held_out = load_rows(spec.eval_source, split=spec.eval_split or "train", file_format=spec.file_format,
                                 subset=spec.subset, trust_remote_code=trust, where=f"{field}.eval_source")
        elif spec.eval_split:
            held_out = load_rows(spec.source, split=spec.eval_split, file_format=spec.file_format,
                                 subset=spec.subset, trust_remote_code=trust, where=f"{field}.eval_split")
        else:
            train, held_out = split_train_eval(train, eval_fraction=spec.eval_fraction or 0.05, seed=cfg.seed)
    required = spec.columns.model_dump()
    if cfg.data.format == "chat" and spec.columns.prompt not in train.column_names:
        del required["prompt"]  # chosen and rejected are whole conversations
    _require_columns(train, required, f"{field}.columns", spec.source)
    _require_columns(held_out, required, f"{field}.columns", spec.eval_source or spec.source)
    if spec.max_train_rows is not None and len(train) > spec.max_train_rows:
        train = train.select(range(spec.max_train_rows))
    if spec.max_eval_rows is not None and len(held_out) > spec.max_eval_rows:
        held_out = held_out.select(range(spec.max_eval_rows))
    return train, held_out


def prompt_rows(cfg: RunConfig, spec: PromptDataSpec, field: str) -> Dataset:
    """PPO's prompts: one text column, or with ``data.format: chat`` one column of conversations
    (``field``: the stage's data block, for error messages)."""
    where = f"{field}.source"
    if spec.source == DEMO_SOURCE:
        rows = load_rows(str(ensure_demo_assets().data_dir / "prompts.jsonl"), where=where)
        if cfg.data.format == "chat":
            rows = _demo_prompt_conversations(rows, "prompt")
    else:
        rows = load_rows(spec.source, split=spec.split, file_format=spec.file_format, subset=spec.subset,
                         trust_remote_code=cfg.model.trust_remote_code, where=where)
    _require_columns(rows, {"column": spec.column}, field, spec.source)
    if spec.max_rows is not None and len(rows) > spec.max_rows:
        rows = rows.select(range(spec.max_rows))
    return rows
