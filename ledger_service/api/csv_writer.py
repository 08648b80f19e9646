"""The one CSV writer. Every CSV the service serves is written by `csv_text`, so none can carry a formula.

Text in a report can come from a relay (a model name), and a spreadsheet evaluates a cell that begins with `=`,
`+`, `-`, `@`, a tab or a carriage return (CSV injection). Such a text cell is written the OWASP way: prefixed with
a single quote and quoted, so it is shown as text and never run. Numbers are written as they are: a negative
amount (`-150`) stays a number. Whether a cell is text or a number is decided by its Python type (`str` or `int`),
which the caller fixes per column; the cell's content never decides.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from decimal import Decimal

Cell = str | int | Decimal | None
"""Text, a number (an exact decimal for USD amounts), or empty."""

FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
NEEDS_QUOTES = (",", '"', "\n", "\r")


def _quoted(text: str) -> str:
    return '"' + text.replace('"', '""') + '"'


def text_cell(text: str) -> str:
    """A text cell, neutralised if a spreadsheet would read it as a formula, quoted where CSV needs it."""
    if text.startswith(FORMULA_STARTS):
        return _quoted("'" + text)
    return _quoted(text) if any(mark in text for mark in NEEDS_QUOTES) else text


def _cell(value: Cell) -> str:
    if value is None:
        return ""
    if isinstance(value, Decimal):  # a number, written in positional notation (never 1E-7)
        return format(value, "f")
    if isinstance(value, bool) or not isinstance(value, int):  # a bool is an int to Python, not a number here
        return text_cell(str(value))
    return str(value)


def csv_text(header: Sequence[str], rows: Iterable[Sequence[Cell]]) -> str:
    """A header line and one line per row, each ending in `\\n`."""
    lines = [",".join(text_cell(name) for name in header)]
    lines += [",".join(_cell(value) for value in row) for row in rows]
    return "".join(line + "\n" for line in lines)
