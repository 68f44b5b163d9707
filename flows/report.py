"""The run summary (DESIGN.md section 4): built from the store, shown as a table and an artifact."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from flows.plan import CheckpointPrice
from flows.ui_artifacts import (
    CheckpointRow,
    checkpoints_markdown,
    goodput_svg,
    loss_curve_svg,
    svg_data_uri,
    throughput_line,
)
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
    corrupt_found: list[dict[str, Any]] = field(default_factory=list)
    """Corrupt checkpoints the flow itself met (resume, evaluation): CorruptCheckpointError
    fields, `found_unix`, and `fell_back_to` when known."""
    errors: list[dict[str, Any]] = field(default_factory=list)
    """Failures that reached the flow as errors (kind, unix, reason): a group failed past its
    retries, a storage that refuses."""
    throughput: list[tuple[int, float]] = field(default_factory=list)
    """(group's last step, training tokens/s of that group)."""
    eval_windows: list[tuple[float, float]] = field(default_factory=list)
    """(start, end) unix of each evaluation the flow waited for, failed ones too."""
    group_totals: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Attempt name -> (train_s, ckpt_s) of every attempt whose result came back."""
    attempt_totals: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Attempt name -> (train_s, ckpt_s) summed from its progress events (all attempts)."""
    rank_failures: list[Any] = field(default_factory=list)
    """Failures of data-parallel groups as the groups saw them (flows.rank_group.RankFailure)."""
    votes: int = 0
    """Votes between replicas (per rank), and the seconds they took (slowest rank)."""
    vote_s: float = 0.0
    vote_wait_s: float = 0.0
    """Of vote_s, waiting for the other replicas' hashes (before commits and group ends)."""
    steps_trained: int = 0
    ranks: list[dict[str, Any]] = field(default_factory=list)
    """The ranks of the last data-parallel group: rank, worker, tokens, train_s."""
    spare_workers: list[str] = field(default_factory=list)
    """Workers that held no rank when the run ended (data parallelism)."""
    last_worker: str | None = None
    """The worker that ran the last batch group whose result came back."""
    redundancy: dict[str, Any] | None = None
    """summary["redundancy"]: standby, spares, roles, quarantined workers, replacements and the
    cluster's size at start and end (flows.redundancy.redundancy_state)."""

    checkpoint_price: CheckpointPrice = field(default_factory=CheckpointPrice)
    """What --ckpt-every auto prices a checkpoint at: the newest groups' samples, kept for the
    run (an epoch subflow, or its retry, goes on from them)."""
    ckpt_auto: dict[str, Any] | None = None
    """summary["ckpt_auto"]: the interval --ckpt-every auto chose last and what it was made of
    (the measured stall per checkpoint, the step time, the MTBF)."""

    def absorb_group(self, result: dict[str, Any]) -> None:
        """Fold one batch group's result in as it arrives (an epoch that fails later keeps it)."""
        self.losses += [tuple(x) for x in result["losses"]]
        self.last_worker = result.get("worker") or self.last_worker
        if result["train_s"] > 0:
            self.throughput.append((result["step"], result["tokens"] / result["train_s"]))
        if result.get("attempt"):
            self.group_totals[result["attempt"]] = (result["train_s"], result["ckpt_s"])
        self.votes += int(result.get("votes", 0))
        self.vote_s += float(result.get("vote_s", 0.0))
        self.vote_wait_s += float(result.get("vote_wait_s", 0.0))
        self.steps_trained += int(result.get("steps_trained", 0))

    def absorb_eval(self, step: int, loss: float) -> None:
        self.evals.append((step, loss))
        self.eval_loss = loss


def _final_checkpoint(store: Any, run_id: str) -> Any:
    """The newest checkpoint that verifies, as its VerifyReport (one full read), or None."""
    for step in reversed(store.steps(run_id)):
        report = store.verify(run_id, step)
        if report.ok:
            return report
    return None


def build_summary(tally: RunTally, status: str, reason: str | None, wall_s: float) -> dict[str, Any]:
    """The summary JSON of DESIGN.md section 4, from the newest verified checkpoint in the store."""
    store = open_store(tally.store_url)
    final_step, final_ckpt, state_hash, train_loss, productive = 0, "", "", float("nan"), 0.0
    try:
        latest = _final_checkpoint(store, tally.run_id)
        if latest is not None:
            meta = store.read_metadata(tally.run_id, latest.ref.step)
            final_step = latest.ref.step
            final_ckpt = store.checkpoint_url(tally.run_id, latest.ref.step)
            state_hash = latest.state_hash
            train_loss = float(meta.get("train_loss", float("nan")))
            productive = max(0.0, float(meta.get("productive_s", 0.0)) - tally.resumed_productive_s)
    except Exception:  # noqa: BLE001 - a summary is still written when the store is the problem
        pass
    wall_s = max(wall_s, 1e-9)
    summary = {
        "run_id": tally.run_id, "status": status, "reason": reason,
        "final_step": final_step, "final_checkpoint": final_ckpt, "state_hash": state_hash,
        "resumed_from_step": tally.resumed_from_step,
        "train_loss": train_loss, "eval_loss": tally.eval_loss,
        "wall_s": round(wall_s, 3), "productive_s": round(productive, 3),
        "ettr": round(min(1.0, productive / wall_s), 4),
        "checkpoints_committed": tally.checkpoints_committed,
        "checkpoint_stall_s": round(tally.checkpoint_stall_s, 3),
        "failures": with_replacement_s(tally.failures, tally.redundancy),
    }
    if tally.redundancy is not None:
        summary["redundancy"] = tally.redundancy
    if tally.ckpt_auto is not None:
        summary["ckpt_auto"] = tally.ckpt_auto
    return summary


def with_replacement_s(failures: list[dict[str, Any]],
                       redundancy: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The failures, each whose worker was replaced with `replacement_s` (request to join):
    what waiting for a new worker cost, the difference between cold and hot standby."""
    out = [dict(f) for f in failures]
    for r in (redundancy or {}).get("replacements", []):
        if r["joined_unix"] is None:
            continue
        mine = [f for f in out if f.get("worker") == r["for"] and "replacement_s" not in f]
        # The replacement answers the newest failure on that worker before it was asked for.
        before = [f for f in mine if (f.get("at_unix") or 0) <= r["requested_unix"]]
        if mine:
            f = before[-1] if before else mine[0]
            f["replacement_s"] = round(r["joined_unix"] - r["requested_unix"], 3)
    return out


def _measure(windows: list[tuple[float, float]]) -> float:
    """Seconds covered by the union of (start, end) windows."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(windows):
        start = max(start, reach)
        if end > start:
            total += end - start
            reach = end
    return total


def _minus(windows: list[tuple[float, float]], holes: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out = []
    for start, end in windows:
        pieces = [(start, end)]
        for h0, h1 in holes:
            pieces = [p for a, b in pieces for p in ((a, min(b, h0)), (max(a, h1), b)) if p[1] > p[0]]
        out += pieces
    return out


def wall_breakdown(wall: tuple[float, float], first_ready_unix: float | None, train_s: float,
                   trained_s: float, stall_s: float, eval_windows: list[tuple[float, float]],
                   recovery_windows: list[tuple[float, float]]) -> dict[str, float]:
    """Where the wall time went, in parts that add up to it (measured, not modelled).

    Args:
        wall: (start, end) unix of the run.
        first_ready_unix: when the first batch group was ready to train (end of start-up).
        train_s: seconds of training steps that survive into the final model.
        trained_s: seconds of every training step this invocation ran (lost ones too).
        stall_s: seconds training waited for checkpoint saves and retention.
        eval_windows: evaluations the flow waited for.
        recovery_windows: from each failure to the attempt that took over being ready.
    Returns:
        startup_s, train_s, eval_s, checkpoint_stall_s, orchestration_s (the rest: between
        groups, task submission, results), recovery_s, lost_s.
    """
    start, end = wall
    ready = min(max(first_ready_unix or end, start), end)
    clip = [(max(a, ready), min(b, end)) for a, b in recovery_windows]
    evals = [(max(a, ready), min(b, end)) for a, b in eval_windows]
    parts = {
        "startup_s": ready - start,
        "train_s": train_s,
        "eval_s": _measure(evals),
        "checkpoint_stall_s": stall_s,
        "recovery_s": _measure(_minus(clip, evals)),
        "lost_s": max(0.0, trained_s - train_s),
    }
    parts["orchestration_s"] = max(0.0, (end - start) - sum(parts.values()))
    return parts


def restamp_wall(summary: dict[str, Any], wall_s: float, after_s: float = 0.0) -> None:
    """Stretch the summary to a longer wall time measured by the caller (the CLI starts the
    clock before the Prefect server and the cluster): the difference is start-up, except the
    last `after_s` seconds, after the flow returned (closing the cluster, the progress view),
    which are orchestration."""
    extra = max(0.0, wall_s - summary["wall_s"])
    after = min(max(0.0, after_s), extra)
    summary["wall_s"] = round(wall_s, 3)
    summary["ettr"] = round(min(1.0, summary["productive_s"] / max(wall_s, 1e-9)), 4)
    if "wall_breakdown" in summary:
        parts = summary["wall_breakdown"]
        parts["startup_s"] = round(parts["startup_s"] + extra - after, 3)
        parts["orchestration_s"] = round(parts.get("orchestration_s", 0.0) + after, 3)


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
                "checkpoints_committed", "checkpoint_stall_s", "workers", "spares"):
        value = summary.get(key)
        if value is None and key == "reason":
            continue
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    table.add_row("failures", str(len(summary.get("failures", []))))
    for key, value in summary.get("wall_breakdown", {}).items():
        table.add_row(f"  {key}", f"{value:.3f}")
    return table


def failures_table(failures: list[dict[str, Any]]) -> Table:
    table = Table(title="Failures")
    cols = ("kind", "step", "worker", "detected_after_s", "recovered_after_s", "lost_steps",
            "restored_from")
    for col in cols:
        table.add_column(col)
    for f in failures:
        table.add_row(*(str(f.get(c)) for c in cols))
    return table


def ranks_table(ranks: list[dict[str, Any]]) -> Table:
    table = Table(title="Ranks (last batch group)")
    for col in ("rank", "worker", "pid", "tokens/s", "restored_from"):
        table.add_column(col)
    for r in ranks:
        table.add_row(str(r["rank"]), str(r["worker"]), str(r["pid"]),
                      f"{r['tokens'] / max(r['train_s'], 1e-9):,.0f}", str(r["restored_from"]))
    return table


def redundancy_table(redundancy: dict[str, Any]) -> Table:
    size = redundancy.get("cluster_size", {})
    table = Table(title=f"Redundancy: {redundancy['standby']} standby, "
                        f"{redundancy['spares_wanted']} spare(s) wanted, cluster "
                        f"{size.get('start')} -> {size.get('end')} workers")
    for col in ("worker", "role", "note"):
        table.add_column(col)
    for worker, role in redundancy["roles"].items():
        table.add_row(worker, role, "")
    for worker in redundancy["spares"]:
        table.add_row(worker, "spare", "")
    for q in redundancy["quarantined"]:
        table.add_row(q["worker"], "quarantined", q["reason"])
    for r in redundancy["replacements"]:
        joined = (f"joined after {r['joined_unix'] - r['requested_unix']:.1f} s"
                  if r["joined_unix"] is not None else "never joined")
        table.add_row(str(r["worker"]), "replacement", f"for {r['for']} ({r['why']}), {joined}")
    return table


def print_summary(console: Console, summary: dict[str, Any]) -> None:
    console.print(summary_table(summary))
    if summary.get("ranks"):
        console.print(ranks_table(summary["ranks"]))
    if summary.get("redundancy"):
        console.print(redundancy_table(summary["redundancy"]))
    if summary.get("failures"):
        console.print(failures_table(summary["failures"]))


def redundancy_markdown(redundancy: dict[str, Any]) -> list[str]:
    """The redundancy section of the artifact: who holds what, who was quarantined and why,
    and what each replacement cost."""
    size = redundancy.get("cluster_size", {})
    lines = ["", "## Redundancy", "",
             f"{redundancy['standby']} standby, {redundancy['spares_wanted']} spare(s) wanted; "
             f"cluster size {size.get('start')} at the start, {size.get('end')} at the end "
             f"(target {size.get('target')}).", "",
             "| worker | role | note |", "|---|---|---|"]
    lines += [f"| {w} | {role} | |" for w, role in redundancy["roles"].items()]
    lines += [f"| {w} | spare | |" for w in redundancy["spares"]]
    lines += [f"| {q['worker']} | quarantined | {q['reason']} |"
              for q in redundancy["quarantined"]]
    for r in redundancy["replacements"]:
        joined = (f"joined {r['joined_unix'] - r['requested_unix']:.1f} s after the request"
                  if r["joined_unix"] is not None else "never joined")
        lines.append(f"| {r['worker']} | replacement | for {r['for']} ({r['why']}), {joined} |")
    return lines


def summary_markdown(summary: dict[str, Any], tally: RunTally,
                     checkpoints: list[CheckpointRow] | None = None) -> str:
    """Markdown for the Prefect UI, most telling first: the headline numbers, the loss curve
    and where the wall time went as pictures, the checkpoints, the failures; every summary
    field last, folded away.

    Args:
        summary: the run summary (DESIGN.md section 4).
        tally: what the flow saw (losses, evaluations, throughput).
        checkpoints: the store's newest checkpoints, verified (flows.ui_artifacts.checkpoint_rows).
    """
    wall = max(summary["wall_s"], 1e-9)
    failures = summary["failures"]
    recovered = [f["recovered_after_s"] for f in failures if f.get("recovered_after_s") is not None]
    run_id = summary["run_id"]
    reason = f" ({summary['reason']})" if summary.get("reason") else ""
    resumed = summary.get("resumed_from_step")
    resumed = f" (resumed from {resumed})" if resumed is not None else ""
    span = sorted({f"{min(recovered, default=0):.1f}", f"{max(recovered, default=0):.1f}"},
                  key=float)
    recovery = f", recovered after {'-'.join(span)} s" if recovered else ""
    curve = loss_curve_svg(tally.losses, tally.evals, failures, summary.get("resumed_from_step"))
    lines = [f"# Rebound run `{run_id}`: {summary['status']}", "",
             "| | |", "|---|---|",
             f"| status | **{summary['status']}**{reason} |",
             f"| final step | {summary['final_step']}{resumed} |",
             f"| train loss / eval loss | {_num(summary.get('train_loss'))} / "
             f"{_num(summary.get('eval_loss'))} |",
             f"| throughput (tokens/s) | {throughput_line(tally.throughput)} |",
             f"| goodput (ETTR) | **{summary['ettr']:.1%}**: {summary['productive_s']:.1f} s of "
             f"training kept, of {summary['wall_s']:.1f} s wall |",
             f"| checkpoints committed | {summary['checkpoints_committed']} "
             f"(saves stalled training {summary['checkpoint_stall_s']:.2f} s) |",
             f"| failures | {len(failures)}{recovery} |",
             f"| state hash | `{summary['state_hash']}` |",
             "", "## Loss", "", f"![Loss curve of run {run_id}]({svg_data_uri(curve)})"]
    if tally.evals:
        lines += ["", "| epoch ends at step | eval loss |", "|---|---|"]
        lines += [f"| {step} | {loss:.4f} |" for step, loss in tally.evals]
    if summary.get("wall_breakdown"):
        lines += ["", "## Goodput: where the wall time went", "",
                  f"![Wall time of run {run_id}]("
                  f"{svg_data_uri(goodput_svg(summary['wall_breakdown'], wall))})", "",
                  "<details><summary>In seconds</summary>", "",
                  "| part | seconds | share |", "|---|---|---|"]
        lines += [f"| {k} | {v:.3f} | {v / wall:.1%} |" for k, v in summary["wall_breakdown"].items()]
        lines += ["", "</details>"]
    lines += checkpoints_markdown(checkpoints or [], summary["checkpoints_committed"],
                                  tally.started_unix)
    lines += ["", "## Failures", ""]
    if failures:
        lines += ["| kind | step | worker | detected after s | recovered after s | lost steps "
                  "| restored from | replacement s |", "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {f.get('kind')} | {f.get('step')} | {f.get('worker')} | "
                  f"{f.get('detected_after_s')} | {f.get('recovered_after_s')} | "
                  f"{f.get('lost_steps')} | {f.get('restored_from')} | "
                  f"{f.get('replacement_s', '')} |"
                  for f in failures]
    else:
        lines.append("none")
    if summary.get("ranks"):
        lines += ["", "## Ranks and spares (last batch group)", "",
                  "| rank | worker | pid | tokens/s | restored from |", "|---|---|---|---|---|"]
        lines += [f"| {r['rank']} | {r['worker']} | {r['pid']} | "
                  f"{r['tokens'] / max(r['train_s'], 1e-9):,.0f} | {r['restored_from']} |"
                  for r in summary["ranks"]]
        lines += [f"| spare | {w} | | | |" for w in tally.spare_workers]
    if summary.get("redundancy"):
        lines += redundancy_markdown(summary["redundancy"])
    # Every field of the summary JSON, folded (<details> survives both UIs' sanitisers).
    lines += ["", "<details><summary>Every summary field</summary>", "",
              "| field | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in summary.items()
              if key not in ("failures", "wall_breakdown", "ranks", "redundancy")]
    lines += ["", "</details>"]
    return "\n".join(lines)


def _num(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)
