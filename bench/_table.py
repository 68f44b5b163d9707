"""Plain-text tables for the benchmarks (rich when it is installed), and the spread of rounds."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """(median, min, max) of one number over the rounds."""
    if not values:
        raise ValueError("spread of no values")
    return statistics.median(values), min(values), max(values)


def with_spread(row: dict, key: str, values: Sequence[float | None], digits: int = 3) -> None:
    """Put the median of `values` at row[key] and their range at row[key_min], row[key_max].

    None values (a number a contender does not have) are left out; all None gives None.
    """
    present = [v for v in values if v is not None]
    if not present:
        row[key] = row[f"{key}_min"] = row[f"{key}_max"] = None
        return
    med, lo, hi = spread(present)
    row[key], row[f"{key}_min"], row[f"{key}_max"] = (round(x, digits) for x in (med, lo, hi))


def display_rows(rows: list[dict]) -> list[dict]:
    """Rows for a table: each `k` with `k_min`/`k_max` beside it shows as "median (min-max)"."""
    out = []
    for r in rows:
        shown = {}
        for k, v in r.items():
            if k.endswith(("_min", "_max")) and k[:-4] in r:
                continue
            lo, hi = r.get(f"{k}_min"), r.get(f"{k}_max")
            shown[k] = f"{v} ({lo}-{hi})" if v is not None and lo is not None and lo != hi else v
        out.append(shown)
    return out


def print_table(title: str, rows: list[dict], ratios: dict[str, float], width: int = 160) -> None:
    """Print rows (dicts with the same keys) as a table, medians with their range, then the ratios."""
    rows = display_rows(rows)
    cols = list(rows[0]) if rows else []
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for c in cols:
            table.add_column(c, justify="left" if c == "method" else "right")
        for r in rows:
            table.add_row(*("" if r[c] is None else str(r[c]) for c in cols))
        # Wide enough for every column even when the output is a pipe (rich assumes 80 there).
        console = Console(width=max(Console().width, width))
        console.print(table)
    except ImportError:
        print(title)
        widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
        for r in rows:
            print("  ".join(("" if r[c] is None else str(r[c])).ljust(w) for c, w in zip(cols, widths, strict=True)))
    for k, v in ratios.items():
        print(f"{k}: {v}")
