"""Which local files a data source names: formats by extension, splits by file name.

``load_rows`` (``pipeline.data.loading``) reads what these helpers pick: a file, a glob, or a
directory whose files are named by split (``train.jsonl``, ``validation.jsonl``).
"""

from __future__ import annotations

import glob as _glob
import os
import re
from pathlib import Path

from raypeft.pipeline.data.errors import DataError

BUILDERS = {"json": "json", "jsonl": "json", "parquet": "parquet", "csv": "csv"}
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
GLOB_CHARS = set("*?[")


def file_format_of(path: str) -> str | None:
    low = path.lower()
    for ext, builder in _EXTENSIONS:
        if low.endswith(ext):
            return builder
    return None


def builder_for(file_format: str | None, where: str) -> str | None:
    if file_format is None:
        return None
    builder = BUILDERS.get(file_format.lower().lstrip("."))
    if builder is None:
        raise DataError(f"{where}: unknown file format '{file_format}'; expected one of json, jsonl, parquet, csv")
    return builder


def looks_local(source: str) -> bool:
    """A path-like source; anything else (``name`` or ``owner/name``) is a hub dataset id."""
    return (
        source.startswith(("/", "./", "../", "~", "\\"))
        or os.path.exists(source)
        or bool(set(source) & GLOB_CHARS)
        or file_format_of(source) is not None
        or bool(re.match(r"^[A-Za-z]:[\\/]", source))
        or source.count("/") > 1
    )


def split_base(split: str) -> str:
    """``"train[:10%]"`` -> ``"train"``: the split name without a slice."""
    return split.split("[", 1)[0].strip()


def _split_of_file(path: str) -> str | None:
    """The split a file's path declares (``validation.jsonl``, ``test/part-0.parquet``), if any."""
    words = set(re.split(r"[-._ 0-9/\\]+", path.lower()))
    for split, names in _SPLIT_WORDS.items():
        if words & set(names):
            return split
    return None


def files_in_dir(directory: str, split: str, builder: str | None, where: str) -> list[str]:
    found = sorted(
        p for p in _glob.glob(os.path.join(directory, "**", "*"), recursive=True)
        if os.path.isfile(p) and file_format_of(p) is not None and not Path(p).name.startswith(".")
    )
    if builder is not None:
        found = [p for p in found if file_format_of(p) == builder]
    if not found:
        raise DataError(f"{where}: no .json, .jsonl, .parquet or .csv files in {directory}")
    named = {p: _split_of_file(os.path.relpath(p, directory)) for p in found}
    base = split_base(split)
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


def one_format(files: list[str], builder: str | None, where: str, place: str) -> str:
    if builder is not None:
        return builder
    formats = sorted({file_format_of(f) or "?" for f in files})
    if formats == ["?"] or "?" in formats:
        bad = next(f for f in files if file_format_of(f) is None)
        raise DataError(f"{where}: unknown file format of {bad}; expected .json, .jsonl, .parquet or .csv "
                        "(or set data.file_format)")
    if len(formats) > 1:
        raise DataError(f"{where}: {place} mixes formats ({', '.join(formats)}); set data.file_format or "
                        "keep one format")
    return formats[0]

