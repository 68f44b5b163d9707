"""Pictures and tables for the run's Prefect artifact: what an operator wants at a glance.

The loss curve and the goodput bar are SVG drawn here (no plotting dependency) and embedded in
the markdown artifact as `data:image/svg+xml` images. That is what Prefect's UIs render: both the
v1 and the v2 UI (3.9) show a data-URI image in markdown, while an inline `<svg>` is stripped by
their HTML sanitiser (checked with headless Chromium screenshots, deployments/screenshot.py).
"""

from __future__ import annotations

import base64
import math
import statistics
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape

from storage import StoreError, open_store
from storage.checks import check_structure

MAX_POINTS = 400
"""Points drawn on the loss curve; longer runs are averaged per bucket of steps."""

CHECKPOINT_ROWS = 12
"""Newest checkpoints listed (the newest read in full to verify it, the others checked by
manifest, marker and file sizes: a run's end must not read every retained checkpoint again)."""

# One palette for both pictures; the white card reads on the UI's light and dark themes.
_TRAIN, _EVAL, _FAIL, _RESUME, _AXIS, _GRID = ("#2563eb", "#ea580c", "#dc2626", "#16a34a",
                                               "#374151", "#e5e7eb")
_PARTS = {"startup_s": ("start-up", "#9ca3af"), "train_s": ("training kept", "#16a34a"),
          "eval_s": ("evaluation", "#0891b2"), "checkpoint_stall_s": ("checkpoint stall", "#ca8a04"),
          "orchestration_s": ("orchestration", "#6366f1"), "recovery_s": ("recovery", "#dc2626"),
          "lost_s": ("lost work", "#f97316")}


def svg_data_uri(svg: str) -> str:
    """The SVG as a data URI, the form a markdown image in the Prefect UI displays."""
    return "data:image/svg+xml;base64," + base64.b64encode(svg.encode()).decode("ascii")


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k apart) covering [lo, hi]."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return []
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / max(count, 1)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _label(value: float) -> str:
    return f"{value:g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"


def _segments(points: list[tuple[int, float]], limit: int) -> list[list[tuple[float, float]]]:
    """The points as runs of consecutive steps (a step range whose losses were lost with a
    killed attempt is a gap, not a straight line), each run averaged over buckets of steps so
    that at most about `limit` points are drawn in all."""
    size = max(1, math.ceil(len(points) / limit))
    runs: list[list[tuple[int, float]]] = []
    for step, value in points:
        if runs and step == runs[-1][-1][0] + 1:
            runs[-1].append((step, value))
        else:
            runs.append([(step, value)])
    return [[(statistics.fmean(s for s, _ in run[i:i + size]),
              statistics.fmean(v for _, v in run[i:i + size])) for i in range(0, len(run), size)]
            for run in runs]


def loss_curve_svg(losses: list[tuple[int, float]], evals: list[tuple[int, float]],
                   failures: list[dict[str, Any]], resumed_from_step: int | None = None,
                   width: int = 640, height: int = 300) -> str:
    """The training loss per step as a line, eval losses as dots, failures and the resume
    point as vertical markers.

    Args:
        losses: (step, train loss) of every step this invocation trained.
        evals: (step, eval loss) at each epoch's end.
        failures: the summary's failures (`kind`, `step`).
        resumed_from_step: where this invocation resumed, if it did.
        width: picture width in px (it scales down with the page).
        height: picture height in px.
    """
    # A step trained twice (lost work redone) keeps its last loss.
    train = sorted({int(s): float(v) for s, v in losses if math.isfinite(v)}.items())
    ev = sorted((int(s), float(v)) for s, v in evals if math.isfinite(v))
    left, right, top, bottom = 58, 24, 30, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="13">',
             f'<rect width="{width}" height="{height}" rx="6" fill="#ffffff"/>']
    if not train and not ev:
        parts += [f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="{_AXIS}">'
                  'no training steps in this invocation</text>', "</svg>"]
        return "".join(parts)
    steps = [s for s, _ in train + ev] + ([resumed_from_step] if resumed_from_step else [])
    values = [v for _, v in train + ev]
    x0, x1 = min(steps), max(steps)
    x1 = x1 if x1 > x0 else x0 + 1
    y0, y1 = min(values), max(values)
    pad = (y1 - y0) * 0.05 or abs(y0) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad

    def px(step: float) -> float:
        return left + (step - x0) / (x1 - x0) * plot_w

    def py(value: float) -> float:
        return top + (y1 - value) / (y1 - y0) * plot_h

    for tick in _nice_ticks(y0, y1):
        y = py(tick)
        parts += [f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" '
                  f'stroke="{_GRID}"/>',
                  f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end" fill="{_AXIS}">'
                  f'{_label(tick)}</text>']
    for tick in _nice_ticks(x0, x1, 8):
        x = px(tick)
        parts += [f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top + plot_h}" y2="{top + plot_h + 4}" '
                  f'stroke="{_AXIS}"/>',
                  f'<text x="{x:.1f}" y="{top + plot_h + 17}" text-anchor="middle" '
                  f'fill="{_AXIS}">{int(tick)}</text>']
    parts += [f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" '
              f'stroke="{_AXIS}"/>',
              f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle" '
              f'fill="{_AXIS}">step</text>']
    markers = [(resumed_from_step, "resumed", _RESUME)] if resumed_from_step is not None else []
    markers += [(f.get("step"), str(f.get("kind")), _FAIL) for f in failures]
    for i, (step, name, colour) in enumerate(markers):
        if step is None or not x0 <= step <= x1:
            continue
        x = px(step)
        # Labels of neighbouring markers are staggered so that they stay readable.
        parts += [f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{top + plot_h}" '
                  f'stroke="{colour}" stroke-dasharray="4 3"/>',
                  f'<text x="{x + 3:.1f}" y="{top + 12 + 13 * (i % 3)}" fill="{colour}">'
                  f'{escape(name)}</text>']
    for run in _segments(train, MAX_POINTS):
        points = " ".join(f"{px(s):.1f},{py(v):.1f}" for s, v in run)
        parts.append(f'<polyline fill="none" stroke="{_TRAIN}" stroke-width="1.6" '
                     f'points="{points}"/>' if len(run) > 1 else
                     f'<circle cx="{px(run[0][0]):.1f}" cy="{py(run[0][1]):.1f}" r="1.5" '
                     f'fill="{_TRAIN}"/>')
    parts += [f'<circle cx="{px(s):.1f}" cy="{py(v):.1f}" r="4.5" fill="{_EVAL}"/>' for s, v in ev]
    per = math.ceil(len(train) / MAX_POINTS)
    averaged = f" (mean of {per} steps)" if per > 1 else ""
    legend = [(f"train loss{averaged}", _TRAIN), ("eval loss", _EVAL)]
    x = left
    for name, colour in legend:
        parts += [f'<rect x="{x}" y="10" width="12" height="12" fill="{colour}"/>',
                  f'<text x="{x + 16}" y="20" fill="{_AXIS}">{escape(name)}</text>']
        x += 30 + 7 * len(name)
    parts.append("</svg>")
    return "".join(parts)


def goodput_svg(breakdown: dict[str, float], wall_s: float, width: int = 640) -> str:
    """Where the wall time went as one stacked bar (summary `wall_breakdown`), with a legend."""
    left, wall = 10, max(wall_s, 1e-9)
    bar, legend = [], []
    x = float(left)
    for key, seconds in breakdown.items():
        w = (width - 2 * left) * max(seconds, 0.0) / wall
        colour = _PARTS.get(key, (key, "#6b7280"))[1]
        bar.append(f'<rect x="{x:.1f}" y="10" width="{w:.1f}" height="26" fill="{colour}"/>')
        x += w
    x, y = float(left), 56.0
    for key, seconds in breakdown.items():
        name, colour = _PARTS.get(key, (key, "#6b7280"))
        text = f"{name} {seconds:.1f} s ({seconds / wall:.0%})"
        if x + 22 + 7 * len(text) > width:  # wrap the legend
            x, y = float(left), y + 18
        legend += [f'<rect x="{x:.1f}" y="{y - 10}" width="12" height="12" fill="{colour}"/>',
                   f'<text x="{x + 16:.1f}" y="{y}" fill="{_AXIS}">{escape(text)}</text>']
        x += 26 + 7 * len(text)
    height = int(y) + 12
    return "".join([f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
                    f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="13">',
                    f'<rect width="{width}" height="{height}" rx="6" fill="#ffffff"/>',
                    *bar, *legend, "</svg>"])


@dataclass(frozen=True)
class CheckpointRow:
    """One committed checkpoint as the artifact lists it."""

    step: int
    nbytes: int
    """Bytes of its chunk files."""
    state_hash: str
    verified: bool | None
    """Every chunk re-read and its hash checked; None when it could not be read at all."""
    created_unix: float
    this_run: bool
    """Committed by this invocation (not by an earlier one it resumed)."""
    problem: str = ""
    full: bool = True
    """Every chunk read and hashed (else: manifest, marker and file sizes checked)."""


def checkpoint_rows(store_url: str, run_id: str, since_unix: float,
                    limit: int = CHECKPOINT_ROWS) -> list[CheckpointRow]:
    """The run's newest committed checkpoints still in the store, each verified in full."""
    rows: list[CheckpointRow] = []
    try:
        store = open_store(store_url)
        steps = store.steps(run_id)[-limit:]
    except StoreError:
        return rows  # the store is the problem: the summary's other sections still say so
    for step in steps:
        full = step == steps[-1]
        try:
            manifest, _ = store.read_manifest(run_id, step)
            if full:
                report = store.verify(run_id, step)
                problems, digest = report.problems, report.state_hash or manifest.state_hash
            else:
                problems = check_structure(store.backend, run_id, step, store._step_dir(
                    run_id, step), store.config.io_threads).problems
                digest = manifest.state_hash
        except StoreError as err:
            rows.append(CheckpointRow(step, 0, "", None, 0.0, False, str(err).splitlines()[0],
                                      full))
            continue
        problem = str(problems[0]).splitlines()[0] if problems else ""
        rows.append(CheckpointRow(step, manifest.nbytes, digest, not problems,
                                  manifest.created_unix, manifest.created_unix >= since_unix,
                                  problem, full))
    return rows


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


def checkpoints_markdown(rows: list[CheckpointRow], committed: int, started_unix: float) -> list[str]:
    """The checkpoints section: what this invocation committed and what the store holds now."""
    lines = ["", "## Checkpoints", "",
             f"{committed} committed by this invocation; the store's newest {len(rows)} "
             "(the newest read back and every chunk's hash checked; the others by manifest, "
             "marker and file sizes):", ""]
    if not rows:
        return lines[:-2] + ["none in the store"]
    lines += ["| step | size | state hash | verified | committed |", "|---|---|---|---|---|"]
    for r in rows:
        verified = {True: "yes" if r.full else "files ok", False: f"**no**: {r.problem}",
                    None: f"unreadable: {r.problem}"}
        when = (f"+{r.created_unix - started_unix:.1f} s" if r.this_run else "earlier run")
        lines.append(f"| {r.step} | {_size(r.nbytes)} | `{r.state_hash[:16]}` | "
                     f"{verified[r.verified]} | {when} |")
    return lines


def throughput_line(throughput: list[tuple[int, float]]) -> str:
    """Tokens/s over the batch groups: median, with the slowest and fastest group."""
    speeds = [v for _, v in throughput]
    if not speeds:
        return "n/a"
    return (f"{statistics.median(speeds):,.0f} tokens/s median over {len(speeds)} group(s) "
            f"({min(speeds):,.0f}-{max(speeds):,.0f})")


def _has_bokeh() -> bool:
    import importlib.util

    return importlib.util.find_spec("bokeh") is not None


def dashboard_address(client: Any) -> str:
    """The Dask dashboard's address, and whether it shows anything: without bokeh on the
    scheduler the address answers only "Dask needs bokeh>=3.1.0 for the dashboard"."""
    try:
        link = client.dashboard_link
    except (KeyError, AttributeError):
        link = None
    if not link:
        return "none (the scheduler serves no dashboard)"
    try:
        has_bokeh = bool(client.run_on_scheduler(_has_bokeh))
    except Exception:  # noqa: BLE001 - a question about a web page never fails the run
        return link
    return link if has_bokeh else f"{link} (shows nothing until bokeh>=3.1 is installed " \
                                  "where the scheduler runs)"
