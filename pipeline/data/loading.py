"""Loading rows: whatever the YAML names, as one ``datasets.Dataset``, or a one-line error.

A local file, a directory, a glob, a saved dataset or a Hugging Face hub id becomes one split of
rows; each failure is a :class:`~raypeft.pipeline.data.errors.DataError` naming the config field
and the path. The place each dataset came from is remembered, so a later column check
(:func:`check_columns`) can name it; :func:`split_train_eval` holds rows out of a single source.
"""

from __future__ import annotations

import glob as _glob
import os
import random
import weakref
from collections.abc import Mapping
from typing import Any

import datasets
from datasets import Dataset, DatasetDict

from raypeft.pipeline.data.errors import DataError, first_line
from raypeft.pipeline.data.sources import (BUILDERS, GLOB_CHARS, builder_for, file_format_of, files_in_dir, looks_local,
                                           one_format, split_base)
from raypeft.pipeline.text_encoding import file_utf8_problem

# Where each loaded dataset object came from, so check_columns can name the path. Keyed by
# identity (Dataset has no __eq__), weakly, so it never keeps rows alive.
_ORIGINS: weakref.WeakKeyDictionary[Dataset, str] = weakref.WeakKeyDictionary()


def _remember(ds: Dataset, origin: str) -> Dataset:
    _ORIGINS[ds] = origin
    return ds


def load_rows(
    source: str,
    *,
    split: str = "train",
    data_files: str | list[str] | None = None,
    file_format: str | None = None,
    subset: str | None = None,
    trust_remote_code: bool = False,
    where: str = "data.source",
) -> Dataset:
    """Load one split of rows from a local file, directory, glob, saved dataset, or hub id.

    Local sources are read with the ``json``/``parquet``/``csv`` builders (format from the
    extension, ``.gz`` allowed; ``file_format`` overrides). A single file or glob is the
    ``train`` split (slices such as ``train[:100]`` work); a directory whose files are named
    by split (``train.jsonl``, ``validation.jsonl``) serves each split, otherwise all its files
    are ``train``; a folder written by ``Dataset.save_to_disk`` is loaded as is. Anything that
    is not path-like (``name`` or ``owner/name``) goes to ``datasets.load_dataset(source,
    subset, split=split)``; with ``data_files`` the source is a builder or hub repo and the
    files are passed through. Every failure is a :class:`DataError` starting with ``where``.
    """
    if not isinstance(source, str) or not source.strip():
        raise DataError(f"{where}: empty data source")
    builder = builder_for(file_format, where)
    source = source.strip()
    expanded = os.path.expanduser(source)

    if data_files is not None:
        files = [data_files] if isinstance(data_files, str) else list(data_files)
        if not files:
            raise DataError(f"{where}: data_files is empty")
        local = [os.path.expanduser(f) for f in files]
        if os.path.isfile(expanded) or (file_format_of(source) is not None and source not in BUILDERS):
            raise DataError(f"{where}: give either a file or data_files, not both ({source})")
        base_dir = expanded if os.path.isdir(expanded) else None
        if source in BUILDERS or base_dir is not None or looks_local(source):
            # Files on this machine: check them here for a clear message (hub repos resolve their own).
            for f in local:
                if set(f) & GLOB_CHARS or "://" in f:
                    continue
                full = f if os.path.isabs(f) or base_dir is None else os.path.join(base_dir, f)
                if not os.path.exists(full):
                    raise DataError(f"{where}: file not found: {os.path.abspath(full)}")
        path = BUILDERS.get(source, expanded if base_dir is not None else source)
        if source in BUILDERS and builder is not None:
            path = builder
        if path in ("json", "csv"):
            check_text_files([f for f in local if os.path.isfile(f)], path, where)
        return _load(path, where, f"{source} ({', '.join(files)})", name=subset, data_files=local, split=split,
                     trust_remote_code=trust_remote_code)

    if looks_local(source):
        if any(c in expanded for c in GLOB_CHARS) and not os.path.exists(expanded):
            files = sorted(p for p in _glob.glob(expanded, recursive=True) if os.path.isfile(p))
            if not files:
                raise DataError(f"{where}: no files match {expanded}")
            place = expanded
        elif os.path.isdir(expanded):
            if os.path.exists(os.path.join(expanded, "state.json")) or os.path.exists(
                    os.path.join(expanded, "dataset_dict.json")):
                return _load_saved(expanded, split, where)
            files = files_in_dir(expanded, split, builder, where)
            place = expanded
            split = "train" + split[len(split_base(split)):]
        elif os.path.isfile(expanded):
            files = [expanded]
            place = expanded
            if os.path.getsize(expanded) == 0:
                raise DataError(f"{where}: {expanded} has no rows")
        else:
            raise DataError(f"{where}: file not found: {os.path.abspath(expanded)}")
        fmt = one_format(files, builder, where, place)
        if split_base(split) != "train":
            raise DataError(f"{where}: split '{split_base(split)}' does not apply to {place}: a local file is "
                            "one 'train' split (name files by split in a directory, or use data.eval_source)")
        empty = [f for f in files if os.path.getsize(f) == 0]
        if len(empty) == len(files):
            raise DataError(f"{where}: {place} has no rows")
        files = [f for f in files if f not in empty]
        check_text_files(files, fmt, where)
        return _load(fmt, where, place, data_files=files, split=split)

    return _load(source, where, source, name=subset, split=split, trust_remote_code=trust_remote_code)


def check_text_files(files: list[str], fmt: str, where: str) -> None:
    """Every local json/jsonl/csv file must be UTF-8: pyarrow reads nothing else, and fails on it
    inside whichever process reads the rows first (a Ray worker, after the run has started)."""
    if fmt == "parquet":
        return
    for f in files:
        if f.lower().endswith(".gz"):
            continue  # compressed: pyarrow's error names the file (rare enough not to decompress here)
        problem = file_utf8_problem(f)
        if problem:
            raise DataError(f"{where}: {os.path.abspath(f)} is {problem}")


def _load(path: str, where: str, place: str, *, trust_remote_code: bool = False, **kwargs: Any) -> Dataset:
    if trust_remote_code:  # removed in datasets 4 (ignored there with a log line); older versions need it
        kwargs["trust_remote_code"] = True
    if kwargs.get("name") is None:
        kwargs.pop("name", None)
    try:
        ds = datasets.load_dataset(path, **kwargs)
    except FileNotFoundError as exc:
        raise DataError(f"{where}: not found: {place} ({first_line(exc)})") from exc
    except StopIteration as exc:  # the json builder on a file of whitespace
        raise DataError(f"{where}: {place} has no rows") from exc
    except Exception as exc:
        msg = first_line(exc)
        if "corresponds to no data" in msg:
            raise DataError(f"{where}: {place} has no rows") from exc
        if type(exc).__name__ in ("DatasetNotFoundError", "RepositoryNotFoundError"):
            raise DataError(f"{where}: dataset '{place}' not found (not a local path, and not reachable on the "
                            f"Hugging Face hub): {msg}") from exc
        if "Unknown split" in msg or "Bad split" in msg:
            raise DataError(f"{where}: {place}: {msg}") from exc
        cause = exc.__cause__ or exc.__context__
        detail = f"{msg}: {first_line(cause)}" if cause is not None and type(exc).__name__ == \
            "DatasetGenerationError" else msg
        raise DataError(f"{where}: could not read {place}: {detail}") from exc
    if not isinstance(ds, Dataset):
        raise DataError(f"{where}: {place} did not give one split of rows (got {type(ds).__name__})")
    if len(ds) == 0:
        raise DataError(f"{where}: {place} has no rows")
    return _remember(ds, place)


def _load_saved(directory: str, split: str, where: str) -> Dataset:
    try:
        ds = datasets.load_from_disk(directory)
    except Exception as exc:
        raise DataError(f"{where}: could not read saved dataset {directory}: {first_line(exc)}") from exc
    base = split_base(split)
    if isinstance(ds, DatasetDict):
        if base not in ds:
            raise DataError(f"{where}: split '{base}' not in {directory}; splits present: {', '.join(ds)}")
        ds = ds[base]
    elif base != "train":
        raise DataError(f"{where}: split '{base}' does not apply to {directory}: it holds one split")
    if "[" in split:
        raise DataError(f"{where}: split slices ('{split}') are not supported for saved datasets")
    if len(ds) == 0:
        raise DataError(f"{where}: {directory} has no rows")
    return _remember(ds, directory)


def check_columns(ds: Dataset, required: Mapping[str, str], where: str) -> None:
    """Fail with one line if any role's column (``{"prompt": "dialogue", ...}``) is missing.

    The message names the config field (``data.columns.<role>``), the place the rows came from,
    and the columns that are present, so the fix is obvious.
    """
    present = list(ds.column_names)
    origin = _ORIGINS.get(ds)
    place = f"{where} ({origin})" if origin and origin != where else where
    for role, column in required.items():
        if column not in present:
            raise DataError(f"data.columns.{role}: column '{column}' not found in {place}; "
                            f"present: {', '.join(present)}")


def split_train_eval(
    ds: Dataset, *, eval_fraction: float | None = None, eval_rows: int | None = None, seed: int = 0,
) -> tuple[Dataset, Dataset]:
    """Hold out rows for evaluation when the user gives a single file: ``(train, eval)``.

    Give exactly one of ``eval_fraction`` (rounded, at least one row) or ``eval_rows``. The
    choice is a seeded sample, so every worker and every rerun gets the same disjoint split;
    both parts keep the original row order.
    """
    if (eval_fraction is None) == (eval_rows is None):
        raise DataError("data.eval_fraction: give exactly one of eval_fraction and eval_rows")
    n = len(ds)
    if eval_fraction is not None:
        if not 0.0 < eval_fraction < 1.0:
            raise DataError(f"data.eval_fraction: must be between 0 and 1, got {eval_fraction}")
        n_eval = max(1, round(n * eval_fraction))
        field = "data.eval_fraction"
    else:
        n_eval = int(eval_rows)  # type: ignore[arg-type]
        field = "data.eval_rows"
        if n_eval < 1:
            raise DataError(f"{field}: must be at least 1, got {n_eval}")
    if n_eval >= n:
        raise DataError(f"{field}: {n_eval} held-out rows leave no training rows (the data has {n})")
    held = set(random.Random(seed).sample(range(n), n_eval))
    train = ds.select([i for i in range(n) if i not in held])
    evals = ds.select(sorted(held))
    origin = _ORIGINS.get(ds)
    if origin:
        _remember(train, origin)
        _remember(evals, origin)
    return train, evals

