"""bench.overhead: Rebound's cost against a plain torch loop, side by side in one invocation.

Both contenders train the same model on the same data for the same steps with the same
checkpoint interval and evaluate at the same epoch ends, each in a fresh process:
  plain_loop  a single-process torch loop saving with torch.save (tmp + fsync + rename)
  rebound     `python -m flows.train`: Prefect + Dask LocalCluster + verified Zarr checkpoints

Rows: startup_s (process start to first training step), train_wall_s (first step to last
checkpoint committed), tokens_per_s over train_wall_s. Ratio (lower is better):
  rebound_vs_plain_loop_wall = rebound train_wall_s / plain_loop train_wall_s   (target <= 1.10)
Start-up is reported on its own row and kept out of the ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from storage import open_store

ROOT = Path(__file__).resolve().parents[1]


def _plain(args: argparse.Namespace, workdir: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "bench.plain_loop", "--model", args.model, "--steps",
         str(args.steps), "--ckpt-every", str(args.ckpt_every), "--threads", str(args.threads),
         "--out", str(workdir), "--started", str(time.time()),
         *(["--data", args.data] if args.data else [])],
        cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rebound(args: argparse.Namespace, workdir: Path) -> dict:
    started = time.time()
    summary_path = workdir / "summary.json"
    store = workdir / "store"
    subprocess.run(
        [sys.executable, "-m", "flows.train", "--no-progress", "--model", args.model,
         "--steps", str(args.steps), "--ckpt-every", str(args.ckpt_every), "--group-steps",
         str(args.group_steps), "--threads", str(args.threads), "--store", str(store),
         "--run-id", "bench", "--fresh", "--summary-json", str(summary_path),
         *(["--data", args.data] if args.data else [])],
        cwd=ROOT, check=True, capture_output=True, text=True)
    summary = json.loads(summary_path.read_text())
    attempts = [doc for _, doc in open_store(str(store)).list_json("bench", "attempts")]
    first_step_at = min(a["ready_unix"] for a in attempts)
    final = store / "bench" / "ckpt" / f"{summary['final_step']:012d}" / "COMMITTED"
    end = final.stat().st_mtime
    return {"startup_s": first_step_at - started, "train_wall_s": end - first_step_at,
            "tokens": None, "ckpt_s": summary["checkpoint_stall_s"],
            "final_loss": summary["train_loss"], "wall_s": summary["wall_s"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="model preset (default small)")
    p.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    p.add_argument("--group-steps", type=int, default=50, help="Rebound steps per task (default 50)")
    p.add_argument("--ckpt-every", type=int, default=50, help="checkpoint interval (default 50)")
    p.add_argument("--threads", type=int, default=2, help="torch threads, both contenders (default 2)")
    p.add_argument("--data", help="corpus (default: the stdlib's source)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="rebound-bench-") as tmp:
        (Path(tmp) / "plain").mkdir()
        plain = _plain(args, Path(tmp) / "plain")
        (Path(tmp) / "rebound").mkdir()
        rebound = _rebound(args, Path(tmp) / "rebound")
    tokens = plain["tokens"]
    rows = []
    for name, r in (("plain_loop", plain), ("rebound", rebound)):
        rows.append({"method": name, "startup_s": round(r["startup_s"], 2),
                     "train_wall_s": round(r["train_wall_s"], 2),
                     "tokens_per_s": round(tokens / r["train_wall_s"], 1),
                     "ckpt_s": round(r["ckpt_s"], 3), "final_loss": round(r["final_loss"], 4)})
    ratios = {"rebound_vs_plain_loop_wall": round(rebound["train_wall_s"] / plain["train_wall_s"], 4)}
    if args.json:
        print(json.dumps({"rows": rows, "ratios": ratios}))
        return 0
    table = Table(title=f"bench.overhead: {args.model}, {args.steps} steps, ckpt every "
                        f"{args.ckpt_every}, group {args.group_steps}, {args.threads} threads")
    for col in rows[0]:
        table.add_column(col)
    for row in rows:
        table.add_row(*(str(v) for v in row.values()))
    console = Console()
    console.print(table)
    for name, value in ratios.items():
        console.print(f"{name} = {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
