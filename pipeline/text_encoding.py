"""Is a text file the user gave us UTF-8? Answered on the driver, before anything reads it.

Configs (YAML), DeepSpeed JSON and row files (json, jsonl, csv) are read as UTF-8 everywhere:
by PyYAML here, by pyarrow inside ``datasets`` in every Ray worker. A latin-1 or UTF-16 file
would otherwise fail as a decoder traceback deep inside one of them (or, for a row file, inside
Ray after the run has started); this module turns it into one line naming the byte and line.
"""

from __future__ import annotations

import codecs
from pathlib import Path

_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"),
         (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))
_CHUNK = 1 << 20


def utf8_problem(data: bytes, *, offset: int = 0, line: int = 1, final: bool = True) -> str | None:
    """Why ``data`` is not UTF-8 text (``None`` when it is), naming the first bad byte and its line.

    ``offset`` / ``line`` say where ``data`` starts in its file, for a file checked in chunks;
    ``final=False``: more follows, so a character cut at the end is not (yet) an error.
    """
    if offset == 0:
        for bom, name in _BOMS:
            if data.startswith(bom):
                return f"{name} text (it starts with a {name} byte-order mark); save it as UTF-8"
    nul = data.find(b"\0")
    if nul >= 0:  # valid UTF-8, but no config or row file holds one: UTF-16 without a byte-order mark
        nul_line = line + data.count(b"\n", 0, nul)
        return f"not UTF-8 text (a NUL byte at offset {offset + nul}, line {nul_line}; UTF-16?); save it as UTF-8"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if not final and exc.reason == "unexpected end of data" and exc.end == len(data):
            return None  # a character split by the chunk boundary: the next chunk decides
        at = exc.start
        at_line = line + data.count(b"\n", 0, at)
        return f"not UTF-8 text (byte 0x{data[at]:02x} at offset {offset + at}, line {at_line}); save it as UTF-8"
    return None


def file_utf8_problem(path: str | Path) -> str | None:
    """``utf8_problem`` of a whole file, read in 1 MiB chunks (row files can be large)."""
    offset, line, carry = 0, 1, b""
    with open(path, "rb") as fh:
        while True:
            block = fh.read(_CHUNK)
            data = carry + block
            problem = utf8_problem(data, offset=offset, line=line, final=not block)
            if problem or not block:
                return problem
            keep = _incomplete_tail(data)
            done = len(data) - keep
            offset += done
            line += data.count(b"\n", 0, done)
            carry = data[done:]


def _incomplete_tail(data: bytes) -> int:
    """How many trailing bytes begin a multi-byte character that the chunk cut off (0-3)."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # not a continuation byte: the start of the last character
            need = 2 if byte & 0xE0 == 0xC0 else 3 if byte & 0xF0 == 0xE0 else 4 if byte & 0xF8 == 0xF0 else 1
            return back if need > back else 0
    return 0
