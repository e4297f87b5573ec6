"""Plain-text tables for results (what `studio VERB` prints; the app draws its own frames)."""

from __future__ import annotations

from typing import Any, Sequence


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    """Columns padded to their widest cell, a rule under the header."""
    cells = [[str(c) for c in header]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [cells[0], ["-" * w for w in widths], *cells[1:]]
    return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in lines)


def number(value: float | None, digits: int = 3) -> str:
    """A number for a table cell ('-' when not computed)."""
    return "-" if value is None else f"{value:.{digits}f}"


def listing(values: Sequence[Any], limit: int = 5) -> str:
    """The first ``limit`` values, comma separated, with how many more."""
    shown = ", ".join(str(v) for v in values[:limit])
    return shown + (f" (+{len(values) - limit} more)" if len(values) > limit else "")
