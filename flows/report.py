"""The run summary (DESIGN.md section 4): built from the store, shown as a table and an artifact."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from storage import open_store


@dataclass
class RunTally:
    """What the flow learns while it runs; the store supplies the rest."""

    run_id: str
    store_url: str
    started_unix: float
    resumed_from_step: int | None = None
    resumed_productive_s: float = 0.0
    checkpoints_committed: int = 0
    checkpoint_stall_s: float = 0.0
    eval_loss: float | None = None
    losses: list[tuple[int, float]] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    failures: list[dict[str, Any]] = field(default_factory=list)
    infra_failures: list[dict[str, Any]] = field(default_factory=list)
    """KilledWorker and the like, seen by the flow (time, reason)."""
    worker_losses: list[dict[str, Any]] = field(default_factory=list)
    """Scheduler remove-worker events: (worker, removed_unix, processing)."""
    hangs: list[dict[str, Any]] = field(default_factory=list)
    """Hung groups the watchdog restarted (worker, detected_unix)."""
    corrupt_on_resume: list[str] = field(default_factory=list)
    throughput: list[tuple[int, float]] = field(default_factory=list)
    """(group's last step, training tokens/s of that group)."""

    def absorb_epoch(self, out: dict[str, Any]) -> None:
        """Fold one epoch subflow's outcome into the run's tally."""
        self.checkpoints_committed += out["checkpoints"]
        self.checkpoint_stall_s += out["stall_s"]
        self.losses += out["losses"]
        self.evals += out["evals"]
        self.infra_failures += out["infra_failures"]
        self.throughput += out["throughput"]
        if out["evals"]:
            self.eval_loss = out["evals"][-1][1]


def build_summary(tally: RunTally, status: str, reason: str | None, wall_s: float) -> dict[str, Any]:
    """The summary JSON of DESIGN.md section 4, from the newest verified checkpoint in the store."""
    store = open_store(tally.store_url)
    final_step, final_ckpt, state_hash, train_loss, productive = 0, "", "", float("nan"), 0.0
    try:
        latest = store.latest_verified_ref(tally.run_id)
    except Exception:  # noqa: BLE001 - a summary is still written when the store is the problem
        latest = None
    if latest is not None:
        meta = store.read_metadata(tally.run_id, latest.step)
        final_step = latest.step
        final_ckpt = store.checkpoint_url(tally.run_id, latest.step)
        state_hash = store.state_hash(tally.run_id, latest.step)
        train_loss = float(meta.get("train_loss", float("nan")))
        productive = max(0.0, float(meta.get("productive_s", 0.0)) - tally.resumed_productive_s)
    wall_s = max(wall_s, 1e-9)
    return {
        "run_id": tally.run_id, "status": status, "reason": reason,
        "final_step": final_step, "final_checkpoint": final_ckpt, "state_hash": state_hash,
        "resumed_from_step": tally.resumed_from_step,
        "train_loss": train_loss, "eval_loss": tally.eval_loss,
        "wall_s": round(wall_s, 3), "productive_s": round(productive, 3),
        "ettr": round(min(1.0, productive / wall_s), 4),
        "checkpoints_committed": tally.checkpoints_committed,
        "checkpoint_stall_s": round(tally.checkpoint_stall_s, 3),
        "failures": tally.failures,
    }


def write_summary_json(summary: dict[str, Any], path: str) -> None:
    """Atomically write the summary (tmp + rename) so a reader never sees half of it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(summary, indent=2, allow_nan=True) + "\n")
    os.replace(tmp, target)


def summary_table(summary: dict[str, Any]) -> Table:
    table = Table(title=f"Rebound run {summary['run_id']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for key in ("status", "reason", "final_step", "resumed_from_step", "train_loss", "eval_loss",
                "state_hash", "final_checkpoint", "wall_s", "productive_s", "ettr",
                "checkpoints_committed", "checkpoint_stall_s"):
        value = summary.get(key)
        if value is None and key == "reason":
            continue
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    table.add_row("failures", str(len(summary.get("failures", []))))
    return table


def failures_table(failures: list[dict[str, Any]]) -> Table:
    table = Table(title="Failures")
    for col in ("kind", "step", "worker", "detected_after_s", "recovered_after_s", "lost_steps"):
        table.add_column(col)
    for f in failures:
        table.add_row(*(str(f.get(c)) for c in ("kind", "step", "worker", "detected_after_s",
                                                 "recovered_after_s", "lost_steps")))
    return table


def print_summary(console: Console, summary: dict[str, Any]) -> None:
    console.print(summary_table(summary))
    if summary.get("failures"):
        console.print(failures_table(summary["failures"]))


def summary_markdown(summary: dict[str, Any], tally: RunTally) -> str:
    """Markdown for the Prefect UI: the summary, the failures, and the loss curve as a table."""
    lines = [f"# Rebound run `{summary['run_id']}`: {summary['status']}", "",
             "| field | value |", "|---|---|"]
    for key, value in summary.items():
        if key != "failures":
            lines.append(f"| {key} | {value} |")
    lines += ["", "## Failures", ""]
    if summary["failures"]:
        lines += ["| kind | step | worker | detected after s | recovered after s | lost steps |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {f.get('kind')} | {f.get('step')} | {f.get('worker')} | "
                  f"{f.get('detected_after_s')} | {f.get('recovered_after_s')} | "
                  f"{f.get('lost_steps')} |" for f in summary["failures"]]
    else:
        lines.append("none")
    lines += ["", "## Loss and throughput", "",
              "| step | train loss | eval loss | tokens/s |", "|---|---|---|---|"]
    evals = {s: f"{v:.4f}" for s, v in tally.evals}
    speed = {s: f"{v:,.0f}" for s, v in tally.throughput}
    # At most ~40 rows: every k-th step, plus every epoch end and group end.
    every = max(1, len(tally.losses) // 40)
    for i, (step, loss) in enumerate(tally.losses):
        if i % every == 0 or step in evals or step in speed or i == len(tally.losses) - 1:
            lines.append(f"| {step} | {loss:.4f} | {evals.get(step, '')} | {speed.get(step, '')} |")
    return "\n".join(lines)
