"""The one error type of the data layer: a user's data problem as one line.

Every problem a user can cause (a missing file, an empty file, a wrong column, a row too long)
becomes a :class:`DataError` whose message starts with the config field and names the place,
so the CLI can report it before Ray starts.
"""

from __future__ import annotations


class DataError(ValueError):
    """A problem with the user's data, reported as one line naming the field and the place."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (a library's multi-line error, cut to one line)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
