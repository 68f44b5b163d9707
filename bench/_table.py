"""Plain-text tables for the benchmarks (rich when it is installed)."""

from __future__ import annotations


def print_table(title: str, rows: list[dict], ratios: dict[str, float]) -> None:
    """Print rows (dicts with the same keys) as a table, then the named ratios."""
    cols = list(rows[0]) if rows else []
    try:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=title)
        for c in cols:
            table.add_column(c, justify="left" if c == "method" else "right")
        for r in rows:
            table.add_row(*("" if r[c] is None else str(r[c]) for c in cols))
        Console().print(table)
    except ImportError:
        print(title)
        widths = [max(len(c), *(len(str(r[c])) for r in rows)) for c in cols]
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
        for r in rows:
            print("  ".join(("" if r[c] is None else str(r[c])).ljust(w) for c, w in zip(cols, widths, strict=True)))
    for k, v in ratios.items():
        print(f"{k}: {v}")
