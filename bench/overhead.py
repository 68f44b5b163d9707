"""bench.overhead: Rebound's cost against a plain torch loop, side by side in one invocation.

Both contenders train the same model on the same data and device for the same steps with the
same checkpoint interval and evaluate at the same epoch ends, each in a fresh process, one after
the other, in alternating order over --rounds rounds:
  plain_loop  a single-process torch loop saving with torch.save (tmp + fsync + rename)
  rebound     `python -m flows.train`: Prefect + Dask LocalCluster + verified Zarr checkpoints

Both timed windows cover the same work. They open with the model built and AdamW's first use
already paid (Rebound's workers pay it while booting; the plain loop pays it just before) and
close after the final evaluation and the final checkpoint's commit (Rebound: when the flow
prints the final epoch's eval loss, which follows the final commit; the plain loop: after its
final fsync + rename).

Rows (one per contender; each number is the median over the rounds, with its min and max beside
it in the table and as NAME_min / NAME_max in --json):
  startup_s     process start to the window's start (cluster, Prefect, model build)
  train_wall_s  the window: first training step to the final evaluation and commit
  tokens_per_s  tokens trained / train_wall_s
  ckpt_s        time spent checkpointing inside the window (Rebound: checkpoint_stall_s)
  final_loss    training loss at the end (plain loop: the last step's; Rebound: its summary's
                train_loss)
--json adds "runs" (each contender's numbers, one entry per round, with machine_gflops: how fast
the machine was around that run, bench/_machine.py), "tokens" and "machine" (every probe, and
how far each round's moved: a round that moved by more than 10% is flagged after the table).
Ratio (lower is better):
  rebound_vs_plain_loop_wall = median rebound train_wall_s / median plain_loop train_wall_s
                               (target <= 1.10); start-up is kept out of it.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench._local_api import kept_api_stopped_after
from bench._machine import MachineSpeed, report_lines
from bench._table import print_table, with_spread
from storage import open_store

ROOT = Path(__file__).resolve().parents[1]
CONTENDERS = ("plain_loop", "rebound")


class BenchError(RuntimeError):
    """A contender did not do what the measurement needs."""


def _plain(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "bench.plain_loop", "--model", args.model, "--steps",
           str(args.steps), "--ckpt-every", str(args.ckpt_every), "--threads", str(args.threads),
           "--device", args.device, "--out", str(workdir), "--started", str(time.time()),
           *(["--data", args.data] if args.data else [])]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    if out.returncode != 0:
        raise BenchError(f"plain_loop exited {out.returncode}:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _final_eval_line(steps: int) -> re.Pattern[str]:
    # flows/train.py says this once the final epoch's evaluation is back, after the final commit.
    return re.compile(rf"epoch \d+ ends at step {steps}: eval loss")


def _rebound(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    summary_path, store = workdir / "summary.json", workdir / "store"
    cmd = [sys.executable, "-m", "flows.train", "--no-progress", "--model", args.model,
           "--steps", str(args.steps), "--ckpt-every", str(args.ckpt_every), "--group-steps",
           str(args.group_steps), "--threads", str(args.threads), "--device", args.device,
           "--store", str(store), "--run-id", "bench", "--fresh",
           "--summary-json", str(summary_path), *(["--data", args.data] if args.data else []),
           *(["--async-save"] if args.async_save else [])]
    final_eval = _final_eval_line(args.steps)
    started = time.time()
    # Its own session: on any failure the whole group (nanny, workers, Prefect server) is stopped.
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                            start_new_session=True)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        # Timestamped as they come: the end of the window is when the final eval line appears.
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append((time.time(), line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        rc = proc.wait(timeout=args.timeout)
    finally:
        # Also after a clean exit: a worker that outlived it would hold the pipe open.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        reader.join(timeout=10)
    tail = "".join(line for _, line in lines[-30:])
    end = next((t for t, line in lines if final_eval.search(line)), None)
    if rc != 0:
        raise BenchError(f"rebound exited {rc}:\n{tail}")
    if end is None:
        raise BenchError(f"rebound never reported the evaluation at step {args.steps}:\n{tail}")
    summary = json.loads(summary_path.read_text())
    attempts = [doc for _, doc in open_store(str(store)).list_json("bench", "attempts")]
    first_step_at = min(a["ready_unix"] for a in attempts)
    marker = store / "bench" / "ckpt" / f"{summary['final_step']:012d}" / "COMMITTED"
    return {"startup_s": first_step_at - started, "train_wall_s": end - first_step_at,
            "window_start_unix": first_step_at, "window_end_unix": end,
            "final_commit_unix": marker.stat().st_mtime,
            "ckpt_s": summary["checkpoint_stall_s"], "final_loss": summary["train_loss"],
            "final_step": summary["final_step"]}


RUNNERS = {"plain_loop": _plain, "rebound": _rebound}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Run both contenders --rounds times in alternating order; rows and ratios (DESIGN §7)."""
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONTENDERS}
    tokens = None
    speed = MachineSpeed()
    with tempfile.TemporaryDirectory(prefix="rebound-bench-") as tmp:
        for round_no in range(args.rounds):
            # Alternate, so neither always runs on a machine the other just warmed (or heated).
            order = CONTENDERS if round_no % 2 == 0 else CONTENDERS[::-1]
            for name in order:
                workdir = Path(tmp) / f"{name}-{round_no}"
                workdir.mkdir()
                r = speed.around(round_no, functools.partial(RUNNERS[name], args, workdir))
                tokens = r.get("tokens", tokens)
                runs[name].append(r)
                print(f"round {round_no + 1}/{args.rounds} {name}: train_wall_s "
                      f"{r['train_wall_s']:.2f}", file=sys.stderr)
    assert tokens is not None
    rows = []
    for name in CONTENDERS:
        row: dict[str, Any] = {"method": name}
        with_spread(row, "startup_s", [r["startup_s"] for r in runs[name]], 2)
        with_spread(row, "train_wall_s", [r["train_wall_s"] for r in runs[name]], 2)
        with_spread(row, "tokens_per_s", [tokens / r["train_wall_s"] for r in runs[name]], 1)
        with_spread(row, "ckpt_s", [r["ckpt_s"] for r in runs[name]], 3)
        with_spread(row, "final_loss", [r["final_loss"] for r in runs[name]], 4)
        rows.append(row)
    by = {r["method"]: r for r in rows}
    ratios = {"rebound_vs_plain_loop_wall":
              round(by["rebound"]["train_wall_s"] / by["plain_loop"]["train_wall_s"], 4)}
    return {"rows": rows, "ratios": ratios, "runs": runs, "tokens": tokens,
            "machine": speed.report()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="model preset (default small)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--group-steps", type=int, default=50, help="Rebound steps per task (default 50)")
    p.add_argument("--ckpt-every", type=int, default=50, help="checkpoint interval (default 50)")
    p.add_argument("--threads", type=int, default=2, help="torch threads, both contenders (default 2)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where both contenders train (default auto: CUDA when present)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, alternating order (default 3)")
    p.add_argument("--async-save", action="store_true",
                   help="Rebound saves in the background (--async-save); the plain loop as before")
    p.add_argument("--data", help="corpus (default: the stdlib's source)")
    p.add_argument("--timeout", type=float, default=1800.0,
                   help="seconds one contender run may take (default 1800)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    if min(args.steps, args.group_steps, args.ckpt_every, args.threads, args.rounds) < 1:
        p.error("--steps, --group-steps, --ckpt-every, --threads and --rounds must be >= 1")
    try:
        out = measure(args)
    except (BenchError, subprocess.TimeoutExpired) as e:
        print(f"bench.overhead: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out))
        return 0
    print_table(f"bench.overhead: {args.model}, {args.steps} steps, ckpt every {args.ckpt_every}, "
                f"group {args.group_steps}, {args.threads} threads, device {args.device}, "
                f"median (min-max) of {args.rounds} rounds", out["rows"], out["ratios"])
    print("\n".join(report_lines(out["machine"])))
    return 0


if __name__ == "__main__":
    # SIGTERM unwinds like an exception, so the finally blocks stop the contender's processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with kept_api_stopped_after():
        status = main()
    sys.exit(status)
