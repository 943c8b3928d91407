"""The one exception the data pipeline raises for bad input: it names the file, the row and the fix."""

from __future__ import annotations


class DataError(ValueError):
    """A corpus, label map, tokenizer or split that cannot be used as configured."""


def at(source: str, row: int | None) -> str:
    """`file:row` prefix for messages (rows count from 1, like line numbers)."""
    return source if row is None else f"{source}:{row}"
