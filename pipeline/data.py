"""The data layer every stage uses: load rows, check columns, tokenize, collate.

Loading turns whatever the YAML names (a local file, a directory, a glob, a saved dataset or a
Hugging Face hub id) into one ``datasets.Dataset``; every problem a user can cause (a missing
file, an empty file, a wrong column) becomes a one-line :class:`DataError` naming the config
field and the path, so the CLI can report it before Ray starts.

Tokenization produces fixed token-id lists (no padding) for SFT, preference pairs (reward model
and DPO) and PPO prompts. Prompt and response are tokenized separately and concatenated, so BPE
never merges across the boundary and the label mask falls exactly on the prompt tokens.

The collators are pure torch and run inside Ray Train workers: they pad a list of tokenized
rows into tensors (right padding for training, left padding for generation).

Nothing here imports ray, mlflow or deepspeed.
"""

from __future__ import annotations

import glob as _glob
import hashlib
import os
import random
import re
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from datasets import Dataset

IGNORE_INDEX = -100
"""Label id the loss ignores: prompt tokens and label padding."""

_BUILDERS = {"json": "json", "jsonl": "json", "parquet": "parquet", "csv": "csv"}
# Longest suffix first, so ".jsonl.gz" is matched before ".gz" could be considered.
_EXTENSIONS: tuple[tuple[str, str], ...] = (
    (".jsonl.gz", "json"), (".json.gz", "json"), (".csv.gz", "csv"),
    (".jsonl", "json"), (".json", "json"), (".parquet", "parquet"), (".pq", "parquet"), (".csv", "csv"),
)
_SPLIT_WORDS = {
    "train": ("train", "training"),
    "validation": ("validation", "valid", "val", "dev", "eval"),
    "test": ("test", "testing"),
}
_GLOB_CHARS = set("*?[")

# Where each loaded dataset object came from, so check_columns can name the path. Keyed by
# identity (Dataset has no __eq__), weakly, so it never keeps rows alive.
_ORIGINS: weakref.WeakKeyDictionary[Dataset, str] = weakref.WeakKeyDictionary()


class DataError(ValueError):
    """A problem with the user's data, reported as one line naming the field and the place."""


@dataclass(frozen=True)
class TruncationReport:
    """How many of ``rows`` were longer than ``max_length`` and were cut to fit."""

    rows: int
    truncated: int

    @property
    def fraction(self) -> float:
        return self.truncated / self.rows if self.rows else 0.0


# ------------------------------------------------------------------------------- loading

def _format_of(path: str) -> str | None:
    low = path.lower()
    for ext, builder in _EXTENSIONS:
        if low.endswith(ext):
            return builder
    return None


def _builder_for(file_format: str | None, where: str) -> str | None:
    if file_format is None:
        return None
    builder = _BUILDERS.get(file_format.lower().lstrip("."))
    if builder is None:
        raise DataError(f"{where}: unknown file format '{file_format}'; expected one of json, jsonl, parquet, csv")
    return builder


def _looks_local(source: str) -> bool:
    """A path-like source; anything else (``name`` or ``owner/name``) is a hub dataset id."""
    return (
        source.startswith(("/", "./", "../", "~", "\\"))
        or os.path.exists(source)
        or bool(set(source) & _GLOB_CHARS)
        or _format_of(source) is not None
        or bool(re.match(r"^[A-Za-z]:[\\/]", source))
        or source.count("/") > 1
    )


def _split_base(split: str) -> str:
    """``"train[:10%]"`` -> ``"train"``: the split name without a slice."""
    return split.split("[", 1)[0].strip()


def _split_of_file(path: str) -> str | None:
    """The split a file's path declares (``validation.jsonl``, ``test/part-0.parquet``), if any."""
    words = set(re.split(r"[-._ 0-9/\\]+", path.lower()))
    for split, names in _SPLIT_WORDS.items():
        if words & set(names):
            return split
    return None


def _files_in_dir(directory: str, split: str, builder: str | None, where: str) -> list[str]:
    found = sorted(
        p for p in _glob.glob(os.path.join(directory, "**", "*"), recursive=True)
        if os.path.isfile(p) and _format_of(p) is not None and not Path(p).name.startswith(".")
    )
    if builder is not None:
        found = [p for p in found if _format_of(p) == builder]
    if not found:
        raise DataError(f"{where}: no .json, .jsonl, .parquet or .csv files in {directory}")
    named = {p: _split_of_file(os.path.relpath(p, directory)) for p in found}
    base = _split_base(split)
    if any(named.values()):
        # Files are named by split (train.jsonl, validation.jsonl): take the requested one.
        want = next((k for k, names in _SPLIT_WORDS.items() if base in names), base)
        chosen = [p for p in found if named[p] == want]
        if not chosen:
            present = sorted({s for s in named.values() if s})
            raise DataError(f"{where}: no files for split '{base}' in {directory}; splits present: {', '.join(present)}")
        return chosen
    if base != "train":
        raise DataError(f"{where}: split '{base}' not found in {directory}: its files are not named by split, "
                        "so all of them are the 'train' split")
    return found


def _one_format(files: list[str], builder: str | None, where: str, place: str) -> str:
    if builder is not None:
        return builder
    formats = sorted({_format_of(f) or "?" for f in files})
    if formats == ["?"] or "?" in formats:
        bad = next(f for f in files if _format_of(f) is None)
        raise DataError(f"{where}: unknown file format of {bad}; expected .json, .jsonl, .parquet or .csv "
                        "(or set data.file_format)")
    if len(formats) > 1:
        raise DataError(f"{where}: {place} mixes formats ({', '.join(formats)}); set data.file_format or "
                        "keep one format")
    return formats[0]


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


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
    builder = _builder_for(file_format, where)
    source = source.strip()
    expanded = os.path.expanduser(source)

    if data_files is not None:
        files = [data_files] if isinstance(data_files, str) else list(data_files)
        if not files:
            raise DataError(f"{where}: data_files is empty")
        local = [os.path.expanduser(f) for f in files]
        if os.path.isfile(expanded) or (_format_of(source) is not None and source not in _BUILDERS):
            raise DataError(f"{where}: give either a file or data_files, not both ({source})")
        base_dir = expanded if os.path.isdir(expanded) else None
        if source in _BUILDERS or base_dir is not None or _looks_local(source):
            # Files on this machine: check them here for a clear message (hub repos resolve their own).
            for f in local:
                if set(f) & _GLOB_CHARS or "://" in f:
                    continue
                full = f if os.path.isabs(f) or base_dir is None else os.path.join(base_dir, f)
                if not os.path.exists(full):
                    raise DataError(f"{where}: file not found: {os.path.abspath(full)}")
        path = _BUILDERS.get(source, expanded if base_dir is not None else source)
        if source in _BUILDERS and builder is not None:
            path = builder
        return _load(path, where, f"{source} ({', '.join(files)})", name=subset, data_files=local, split=split,
                     trust_remote_code=trust_remote_code)

    if _looks_local(source):
        if any(c in expanded for c in _GLOB_CHARS) and not os.path.exists(expanded):
            files = sorted(p for p in _glob.glob(expanded, recursive=True) if os.path.isfile(p))
            if not files:
                raise DataError(f"{where}: no files match {expanded}")
            place = expanded
        elif os.path.isdir(expanded):
            if os.path.exists(os.path.join(expanded, "state.json")) or os.path.exists(
                    os.path.join(expanded, "dataset_dict.json")):
                return _load_saved(expanded, split, where)
            files = _files_in_dir(expanded, split, builder, where)
            place = expanded
            split = "train" + split[len(_split_base(split)):]
        elif os.path.isfile(expanded):
            files = [expanded]
            place = expanded
            if os.path.getsize(expanded) == 0:
                raise DataError(f"{where}: {expanded} has no rows")
        else:
            raise DataError(f"{where}: file not found: {os.path.abspath(expanded)}")
        fmt = _one_format(files, builder, where, place)
        if _split_base(split) != "train":
            raise DataError(f"{where}: split '{_split_base(split)}' does not apply to {place}: a local file is "
                            "one 'train' split (name files by split in a directory, or use data.eval_source)")
        empty = [f for f in files if os.path.getsize(f) == 0]
        if len(empty) == len(files):
            raise DataError(f"{where}: {place} has no rows")
        files = [f for f in files if f not in empty]
        return _load(fmt, where, place, data_files=files, split=split)

    return _load(source, where, source, name=subset, split=split, trust_remote_code=trust_remote_code)


def _load(path: str, where: str, place: str, *, trust_remote_code: bool = False, **kwargs: Any) -> Dataset:
    import datasets

    if trust_remote_code:  # removed in datasets 4 (ignored there with a log line); older versions need it
        kwargs["trust_remote_code"] = True
    if kwargs.get("name") is None:
        kwargs.pop("name", None)
    try:
        ds = datasets.load_dataset(path, **kwargs)
    except FileNotFoundError as exc:
        raise DataError(f"{where}: not found: {place} ({_first_line(exc)})") from exc
    except StopIteration as exc:  # the json builder on a file of whitespace
        raise DataError(f"{where}: {place} has no rows") from exc
    except Exception as exc:
        msg = _first_line(exc)
        if "corresponds to no data" in msg:
            raise DataError(f"{where}: {place} has no rows") from exc
        if type(exc).__name__ in ("DatasetNotFoundError", "RepositoryNotFoundError"):
            raise DataError(f"{where}: dataset '{place}' not found (not a local path, and not reachable on the "
                            f"Hugging Face hub): {msg}") from exc
        if "Unknown split" in msg or "Bad split" in msg:
            raise DataError(f"{where}: {place}: {msg}") from exc
        cause = exc.__cause__ or exc.__context__
        detail = f"{msg}: {_first_line(cause)}" if cause is not None and type(exc).__name__ == \
            "DatasetGenerationError" else msg
        raise DataError(f"{where}: could not read {place}: {detail}") from exc
    if not isinstance(ds, Dataset):
        raise DataError(f"{where}: {place} did not give one split of rows (got {type(ds).__name__})")
    if len(ds) == 0:
        raise DataError(f"{where}: {place} has no rows")
    return _remember(ds, place)


def _load_saved(directory: str, split: str, where: str) -> Dataset:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(directory)
    except Exception as exc:
        raise DataError(f"{where}: could not read saved dataset {directory}: {_first_line(exc)}") from exc
    base = _split_base(split)
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


# ------------------------------------------------------------------------------- tokenization

Truncation = Literal["left-prompt", "error"]


@dataclass(frozen=True)
class _Specials:
    """Tokens the tokenizer adds around one sequence (``add_special_tokens=True``)."""

    prefix: list[int]
    suffix: list[int]


def _specials(tokenizer: Any) -> _Specials:
    probe = "hello world"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe, add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(bare) + 1):
        if full[start:start + len(bare)] == bare:
            return _Specials(prefix=list(full[:start]), suffix=list(full[start + len(bare):]))
    return _Specials(prefix=[], suffix=[])  # tokenizer rewrites the text itself: add nothing


def _eos(tokenizer: Any, needed: bool) -> list[int]:
    if not needed:
        return []
    if tokenizer.eos_token_id is None:
        raise DataError("model.tokenizer: the tokenizer has no eos token to end responses with")
    return [int(tokenizer.eos_token_id)]


def _format_prompts(template: str, prompts: Sequence[Any], column: str) -> list[str]:
    try:
        return [template.format(prompt=p) for p in prompts]
    except (KeyError, IndexError, ValueError) as exc:
        raise DataError(f"data.prompt_template: cannot format with the '{column}' column: {_first_line(exc)} "
                        "(write literal braces as '{{' and '}}')") from exc


def _texts(values: Sequence[Any], column: str, start: int) -> list[str]:
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise DataError(f"data.columns: column '{column}' row {start + i} is {type(v).__name__}, not text")
    return list(values)


def _ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _fit(prefix: list[int], body: list[int], suffix: list[int], responses: list[list[int]],
         max_length: int) -> tuple[list[int], list[list[int]], bool]:
    """Left-truncate the prompt body and cut responses so prefix+body+suffix+response <= max_length.

    One prompt serves every response (both sides of a preference pair), so the body is cut for
    the longest response and all sides keep the identical prompt tokens.
    """
    fixed = len(prefix) + len(suffix)
    longest = max((len(r) for r in responses), default=0)
    if fixed + len(body) + longest <= max_length:
        return body, responses, False
    room = max_length - fixed - (1 if body else 0)  # keep at least one prompt token
    responses = [r[:room] for r in responses]
    longest = max((len(r) for r in responses), default=0)
    keep = max_length - fixed - longest
    return (body[max(0, len(body) - keep):] if keep > 0 else []), responses, True


def _fingerprint(ds: Dataset, tokenizer: Any, *parts: Any) -> str:
    h = hashlib.sha256(repr((ds._fingerprint, type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""),
                             len(tokenizer), parts)).encode())
    return h.hexdigest()[:16]


def _map(ds: Dataset, fn: Callable[..., dict], tokenizer: Any, desc: str, *parts: Any) -> Dataset:
    # In memory with our own fingerprint: no hashing of the tokenizer, and no cache files that
    # several Ray workers on one node would race to write.
    return ds.map(fn, batched=True, with_indices=True, remove_columns=ds.column_names, keep_in_memory=True,
                  load_from_cache_file=False, new_fingerprint=_fingerprint(ds, tokenizer, desc, *parts), desc=desc)


def _check_length(max_length: int, specials: _Specials) -> None:
    if max_length < len(specials.prefix) + len(specials.suffix) + 2:
        raise DataError(f"data.max_length: {max_length} leaves no room for a prompt and a response")


def _too_long(index: int, prompt: int, response: int, max_length: int, what: str = "response") -> DataError:
    return DataError(f"data.max_length: row {index} has {prompt + response} tokens (prompt {prompt}, {what} "
                     f"{response}), more than max_length={max_length}; set data.truncation: left-prompt "
                     "or raise data.max_length")


def tokenize_sft(
    ds: Dataset,
    tokenizer: Any,
    *,
    prompt_column: str,
    response_column: str,
    prompt_template: str = "{prompt}",
    max_length: int,
    is_seq2seq: bool = False,
    add_eos: bool = True,
    truncation: Truncation = "left-prompt",
) -> tuple[Dataset, TruncationReport]:
    """Token ids for supervised fine-tuning: ``input_ids`` and ``labels`` (no padding).

    Causal LM: ``input_ids = [bos?] + prompt + response + [eos]`` with the prompt being
    ``prompt_template.format(prompt=row[prompt_column])``; ``labels`` are the same ids with
    every prompt token (bos included) set to -100, so the loss is on the response only.
    Prompt and response are tokenized separately (the response exactly as written, leading
    space included). Special tokens the tokenizer would append after a sequence are not put
    between prompt and response.

    Seq2seq: ``input_ids`` = the tokenized prompt with the tokenizer's special tokens,
    ``labels`` = response + eos; each is cut to ``max_length``.

    Too long rows: ``"left-prompt"`` drops tokens from the start of the prompt body (bos kept)
    so the response survives; a response longer than ``max_length - 1`` (less specials) loses
    its end (and its eos). ``"error"`` raises :class:`DataError` naming the first such row.
    """
    if truncation not in ("left-prompt", "error"):
        raise DataError(f"data.truncation: unknown mode '{truncation}'; expected left-prompt or error")
    specials = _specials(tokenizer)
    _check_length(max_length, specials)
    eos = _eos(tokenizer, add_eos)
    prefix = specials.prefix
    suffix = specials.suffix if is_seq2seq else []
    truncated = [0]

    def fn(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        prompts = _format_prompts(prompt_template, _texts(batch[prompt_column], prompt_column, indices[0]),
                                  prompt_column)
        bodies = _ids(tokenizer, prompts)
        responses = _ids(tokenizer, _texts(batch[response_column], response_column, indices[0]))
        out_ids, out_labels = [], []
        for idx, body, resp in zip(indices, bodies, responses):
            resp = resp + eos
            if is_seq2seq:
                p_len = len(prefix) + len(body) + len(suffix)
                if p_len > max_length or len(resp) > max_length:
                    if truncation == "error":
                        what = "prompt" if p_len > max_length else "response"
                        n = p_len if p_len > max_length else len(resp)
                        raise DataError(f"data.max_length: row {idx} {what} has {n} tokens, more than "
                                        f"max_length={max_length}; set data.truncation: left-prompt or raise "
                                        "data.max_length")
                    truncated[0] += 1
                    keep = max_length - len(prefix) - len(suffix)
                    body = body[len(body) - keep:] if len(body) > keep else body
                    resp = resp[:max_length]
                out_ids.append(prefix + body + suffix)
                out_labels.append(resp)
                continue
            if len(prefix) + len(body) + len(resp) > max_length:
                if truncation == "error":
                    raise _too_long(idx, len(prefix) + len(body), len(resp), max_length)
                truncated[0] += 1
                body, (resp,), _ = _fit(prefix, body, [], [resp], max_length)
            prompt_ids = prefix + body
            out_ids.append(prompt_ids + resp)
            out_labels.append([IGNORE_INDEX] * len(prompt_ids) + resp)
        return {"input_ids": out_ids, "labels": out_labels}

    _require(ds, [prompt_column, response_column])
    out = _map(ds, fn, tokenizer, "tokenize sft", prompt_column, response_column, prompt_template, max_length,
               is_seq2seq, add_eos, truncation)
    return out, TruncationReport(rows=len(ds), truncated=truncated[0])


def tokenize_pairs(
    ds: Dataset,
    tokenizer: Any,
    *,
    prompt_column: str,
    chosen_column: str,
    rejected_column: str,
    prompt_template: str = "{prompt}",
    max_length: int,
    add_eos: bool = True,
    truncation: Truncation = "left-prompt",
) -> tuple[Dataset, TruncationReport]:
    """Token ids for preference pairs (reward model, DPO), causal LM layout.

    Gives ``chosen_input_ids``/``chosen_labels`` and ``rejected_input_ids``/``rejected_labels``,
    each built like :func:`tokenize_sft` (prompt masked with -100, eos appended). Both sides
    share one prompt; when either side is too long the prompt is cut by the same amount on both,
    so chosen and rejected always see identical prompt tokens. A row counts as truncated once.
    """
    if truncation not in ("left-prompt", "error"):
        raise DataError(f"data.truncation: unknown mode '{truncation}'; expected left-prompt or error")
    specials = _specials(tokenizer)
    _check_length(max_length, specials)
    eos = _eos(tokenizer, add_eos)
    prefix = specials.prefix
    truncated = [0]

    def fn(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        start = indices[0]
        prompts = _format_prompts(prompt_template, _texts(batch[prompt_column], prompt_column, start), prompt_column)
        bodies = _ids(tokenizer, prompts)
        chosen = _ids(tokenizer, _texts(batch[chosen_column], chosen_column, start))
        rejected = _ids(tokenizer, _texts(batch[rejected_column], rejected_column, start))
        out: dict[str, list] = {"chosen_input_ids": [], "chosen_labels": [],
                                "rejected_input_ids": [], "rejected_labels": []}
        for idx, body, c, r in zip(indices, bodies, chosen, rejected):
            c, r = c + eos, r + eos
            longest = max(len(c), len(r))
            if len(prefix) + len(body) + longest > max_length:
                if truncation == "error":
                    side = "chosen" if len(c) >= len(r) else "rejected"
                    raise _too_long(idx, len(prefix) + len(body), longest, max_length, side)
                truncated[0] += 1
                body, (c, r), _ = _fit(prefix, body, [], [c, r], max_length)
            prompt_ids = prefix + body
            mask = [IGNORE_INDEX] * len(prompt_ids)
            out["chosen_input_ids"].append(prompt_ids + c)
            out["chosen_labels"].append(mask + c)
            out["rejected_input_ids"].append(prompt_ids + r)
            out["rejected_labels"].append(mask + r)
        return out

    _require(ds, [prompt_column, chosen_column, rejected_column])
    out = _map(ds, fn, tokenizer, "tokenize pairs", prompt_column, chosen_column, rejected_column, prompt_template,
               max_length, add_eos, truncation)
    return out, TruncationReport(rows=len(ds), truncated=truncated[0])


def tokenize_prompts(
    ds: Dataset,
    tokenizer: Any,
    *,
    prompt_column: str,
    prompt_template: str = "{prompt}",
    max_length: int,
    is_seq2seq: bool = False,
) -> Dataset:
    """Prompt ids for generation (PPO rollouts, evaluation): ``input_ids`` and ``prompt_text``.

    ``input_ids`` is ``[bos?] + template(prompt)`` (plus the tokenizer's trailing specials for
    seq2seq), cut from the left to ``max_length`` so the instruction at the end of the template
    survives. ``prompt_text`` is the row's prompt column unchanged (no template), so a reward
    model can rebuild the exact text with :func:`tokenize_pairs`' template.
    """
    specials = _specials(tokenizer)
    prefix = specials.prefix
    suffix = specials.suffix if is_seq2seq else []
    if max_length < len(prefix) + len(suffix) + 1:
        raise DataError(f"data.max_length: {max_length} leaves no room for a prompt")

    def fn(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        raw = _texts(batch[prompt_column], prompt_column, indices[0])
        bodies = _ids(tokenizer, _format_prompts(prompt_template, raw, prompt_column))
        keep = max_length - len(prefix) - len(suffix)
        ids = [prefix + (b[len(b) - keep:] if len(b) > keep else b) + suffix for b in bodies]
        return {"input_ids": ids, "prompt_text": raw}

    _require(ds, [prompt_column])
    return _map(ds, fn, tokenizer, "tokenize prompts", prompt_column, prompt_template, max_length, is_seq2seq)


def _require(ds: Dataset, columns: list[str]) -> None:
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise DataError(f"data.columns: column '{missing[0]}' not found; present: {', '.join(ds.column_names)}")


# ------------------------------------------------------------------------------- collators

def _round_up(n: int, multiple: int | None) -> int:
    if not multiple:
        return n
    return ((n + multiple - 1) // multiple) * multiple


def _pad(seqs: Sequence[Sequence[int]], value: int, side: str, multiple: int | None,
         length: int | None = None) -> torch.Tensor:
    width = _round_up(length if length is not None else max((len(s) for s in seqs), default=0), multiple)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if not len(s):
            continue
        t = torch.as_tensor(s, dtype=torch.long)
        if side == "left":
            out[i, width - len(s):] = t
        else:
            out[i, :len(s)] = t
    return out


def _mask(seqs: Sequence[Sequence[int]], width: int, side: str) -> torch.Tensor:
    out = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if side == "left":
            out[i, width - len(s):] = 1
        else:
            out[i, :len(s)] = 1
    return out


class _Collator:
    def __init__(self, pad_token_id: int | None, pad_to_multiple_of: int | None = None,
                 padding_side: Literal["right", "left"] = "right") -> None:
        if pad_token_id is None:
            raise DataError("model.tokenizer: the tokenizer has no pad token (set one, e.g. eos)")
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be positive, got {pad_to_multiple_of}")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_side = padding_side

    def _ids_and_mask(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = _pad(seqs, self.pad_token_id, self.padding_side, self.pad_to_multiple_of)
        return ids, _mask(seqs, ids.shape[1], self.padding_side)


class SFTCollator(_Collator):
    """Pad tokenized SFT rows into ``input_ids``, ``attention_mask`` and ``labels`` tensors.

    Right padding by default (training); ``padding_side="left"`` for batched generation.
    ``labels`` are padded with -100 on the same side, to their own longest row (the same width
    as ``input_ids`` for causal LMs; seq2seq labels have their own length). The attention mask
    comes from the row lengths, not the pad id, since pad often equals eos.
    """

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("SFTCollator: empty batch")
        seqs = [r["input_ids"] for r in rows]
        ids, mask = self._ids_and_mask(seqs)
        batch = {"input_ids": ids, "attention_mask": mask}
        if "labels" in rows[0]:
            labels = [r["labels"] for r in rows]
            same = all(len(a) == len(b) for a, b in zip(labels, seqs))
            batch["labels"] = _pad(labels, IGNORE_INDEX, self.padding_side, self.pad_to_multiple_of,
                                   length=ids.shape[1] if same else None)
        return batch


class PairCollator(_Collator):
    """Pad preference rows into one batch of ``2B`` rows: the B chosen, then the B rejected.

    One forward pass of the reward model (or policy, for DPO) scores both sides; split its
    output back with :meth:`split` / :func:`split_pairs`. Chosen and rejected share one width.
    """

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("PairCollator: empty batch")
        seqs = [r["chosen_input_ids"] for r in rows] + [r["rejected_input_ids"] for r in rows]
        ids, mask = self._ids_and_mask(seqs)
        batch = {"input_ids": ids, "attention_mask": mask}
        if "chosen_labels" in rows[0]:
            labels = [r["chosen_labels"] for r in rows] + [r["rejected_labels"] for r in rows]
            batch["labels"] = _pad(labels, IGNORE_INDEX, self.padding_side, self.pad_to_multiple_of,
                                   length=ids.shape[1])
        return batch

    @staticmethod
    def split(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return split_pairs(x)


def split_pairs(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(chosen, rejected)`` halves along dim 0 of a tensor computed on a :class:`PairCollator` batch."""
    if x.shape[0] % 2:
        raise ValueError(f"split_pairs: a pair batch has an even number of rows, got {x.shape[0]}")
    half = x.shape[0] // 2
    return x[:half], x[half:]


class PromptCollator(_Collator):
    """Left-pad prompt rows for generation: ``input_ids`` and ``attention_mask``.

    With ``keep_text=True`` the batch also carries ``prompt_text`` (a list of str), so callers
    that move every value to a device should leave it off.
    """

    def __init__(self, pad_token_id: int | None, pad_to_multiple_of: int | None = None, *,
                 keep_text: bool = False) -> None:
        super().__init__(pad_token_id, pad_to_multiple_of, padding_side="left")
        self.keep_text = keep_text

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not rows:
            raise ValueError("PromptCollator: empty batch")
        ids, mask = self._ids_and_mask([r["input_ids"] for r in rows])
        batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
        if self.keep_text and "prompt_text" in rows[0]:
            batch["prompt_text"] = [r["prompt_text"] for r in rows]
        return batch


def count_tokens(batch: Mapping[str, Any]) -> int:
    """Non-pad input tokens in a collated batch (for tokens/s): the attention mask's sum.

    Without an attention mask every position of ``input_ids`` counts. Seq2seq decoder tokens
    (``labels``) are not included.
    """
    mask = batch.get("attention_mask")
    if mask is not None:
        return int(mask.sum().item())
    return int(batch["input_ids"].numel())
