"""Plain-text tables and number formats shared by every report."""

from __future__ import annotations

from collections.abc import Sequence


def format_table(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, row in enumerate(rows):
        out.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def human(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def ratio(before: int | None, after: int | None) -> str:
    if not before or not after:
        return "?"
    return f"{before / after:.2f}x"


def format_rows(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A table with a header row, as one string."""
    return "\n".join(format_table([tuple(headers), *map(tuple, rows)]))
