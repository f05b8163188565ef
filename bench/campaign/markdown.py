"""The campaign's text: markdown cells and tables, short names, and errors as one line or a traceback block."""

from __future__ import annotations

import math
import traceback


def cell(value) -> str:
    """A table cell: '-' for None, floats to 3 significant digits below 0.01 and to 2 decimals above, '|' escaped."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3g}" if abs(value) < 0.01 and value else f"{value:,.2f}"
    return str(value).replace("|", "\\|")


def table_lines(header: list[str], rows: list[list]) -> list[str]:
    """A markdown table: the header as given, every row's values through `cell`."""
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows])


def short(name: str, width: int = 70) -> str:
    """`name` cut to `width` characters, an ellipsis marking the cut."""
    return name if len(name) <= width else name[: width - 1] + "…"


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, at most 300 characters."""
    return (str(error).strip().splitlines() or [""])[0][:300]


def error_text(error: BaseException) -> str:
    """'ValueError: its first line'."""
    return f"{type(error).__name__}: {first_line(error)}"


def traceback_lines() -> list[str]:
    """The exception being handled, as a fenced block of the report."""
    return ["```text", traceback.format_exc().rstrip(), "```"]
