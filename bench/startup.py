"""bench.startup: from the command to the first completed training step, side by side.
Every contender trains the same model preset on the same data for --steps steps (one process
of --threads torch threads) and is timed from just before its command starts to the end of its
first optimizer step:
  torchrun        `torchrun --standalone --nproc-per-node=1 bench/torchrun_train.py`: the same
                  Trainer; the first step's time is the first line of its step log.
  rebound_cold    `python -m flows.train` with REBOUND_API_IDLE=0 REBOUND_CLUSTER_IDLE=0
                  REBOUND_COORDINATOR_IDLE=0: the run starts its own Prefect API and its own
                  LocalCluster, and stops both.
  rebound_kept_api
                  REBOUND_CLUSTER_IDLE=0 REBOUND_COORDINATOR_IDLE=0: the Prefect API kept
                  between runs (flows/kept_api.py) is reused; the run starts its own cluster
                  (the workers' forkserver imports).
  rebound_kept_cluster
                  REBOUND_COORDINATOR_IDLE=0: the kept API and the Dask cluster kept between
                  runs (flows/kept_cluster.py) are both reused; the run starts no worker, and
                  its command imports Prefect, Dask and the rest itself.
  rebound_warm    the defaults: as rebound_kept_cluster, and the command hands its run to the
                  coordinator kept with those imports done (flows/kept_coordinator.py).
Rebound's first step is the first `first_step_unix` of its attempt records in the store. Each
Rebound contender has its own REBOUND_HOME (one Prefect database per server), primed by one run
that is not timed (the database is created, the kept servers are started): every timed run
finds a warm machine, as a user's second run does. PREFECT_API_URL and PREFECT_HOME are
removed from the runs' environment. The contenders run one after the other in alternating order
per round; what the bench started (the kept servers included) is stopped at its end, by PID.
Rows (median over --rounds, with min and max):
  first_step_s    command -> first step completed
  ready_s         Rebound: command -> the first batch group ready to train (trainer built,
                  state restored); torchrun: the checkpoint loaded, before the first step
  started_s       Rebound: command -> the first batch group started on its worker
  wall_s          the whole run, command to exit
Ratios: rebound_warm_vs_torchrun_first_step = rebound_warm first_step_s / torchrun's (lower is
better for Rebound); rebound_warm_first_step_s = the median itself (issue 11's aim: <= 5 s on a
warm machine); rebound_cold_vs_warm_first_step (each where its contenders ran).
--json adds "runs": every contender's numbers per round.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench._table import print_table, with_spread
from bench.recovery import BenchError, _process, _torchrun_cmd, _wait
from flows.kept_api import stop_kept_server
from flows.kept_cluster import stop_kept_cluster
from flows.kept_coordinator import stop_kept_coordinator
from storage import open_store

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_SCRIPT = ROOT / "bench" / "torchrun_train.py"
REBOUND_ENV = {
    "rebound_cold": {"REBOUND_API_IDLE": "0", "REBOUND_CLUSTER_IDLE": "0",
                     "REBOUND_COORDINATOR_IDLE": "0"},
    "rebound_kept_api": {"REBOUND_API_IDLE": "15m", "REBOUND_CLUSTER_IDLE": "0",
                         "REBOUND_COORDINATOR_IDLE": "0"},
    "rebound_kept_cluster": {"REBOUND_API_IDLE": "15m", "REBOUND_CLUSTER_IDLE": "15m",
                             "REBOUND_COORDINATOR_IDLE": "0"},
    "rebound_warm": {"REBOUND_API_IDLE": "15m", "REBOUND_CLUSTER_IDLE": "15m",
                     "REBOUND_COORDINATOR_IDLE": "15m"},
}
CONTENDERS = ("torchrun", *REBOUND_ENV)
NUMERIC = ("first_step_s", "ready_s", "started_s", "wall_s")


def _rebound_env(home: Path, name: str) -> dict[str, str]:
    # Its own Prefect home and database under REBOUND_HOME, and no server from outside.
    env = {k: v for k, v in os.environ.items()
           if k not in ("PREFECT_API_URL", "PREFECT_HOME") and not k.startswith("REBOUND_")}
    return {**env, "REBOUND_HOME": str(home), **REBOUND_ENV[name]}


def run_rebound(args: argparse.Namespace, workdir: Path, name: str, home: Path) -> dict[str, Any]:
    store = workdir / "store"
    cmd = [sys.executable, "-m", "flows.train", "--no-progress", "--model", args.model,
           "--steps", str(args.steps), "--group-steps", str(args.steps), "--ckpt-every",
           str(args.steps), "--threads", str(args.threads), "--device", "cpu", "--store",
           str(store), "--run-id", "bench", *(["--data", args.data] if args.data else [])]
    started = time.time()
    with _process(cmd, workdir, name, env=_rebound_env(home, name)) as proc:
        _wait(proc, args.timeout, name, workdir / f"{name}.out")
    wall_s = time.time() - started
    attempts = [doc for _, doc in open_store(str(store)).list_json("bench", "attempts")]
    if not attempts:
        raise BenchError(f"{name}: no attempt record in {store}")
    first = min(attempts, key=lambda a: a["started_unix"])
    return {"first_step_s": min(a["first_step_unix"] for a in attempts) - started,
            "ready_s": first["ready_unix"] - started,
            "started_s": first["started_unix"] - started, "wall_s": wall_s}


def run_torchrun(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    out = workdir / "out"
    cmd = [*_torchrun_cmd(), "--standalone", "--nproc-per-node=1", "--local-addr", "127.0.0.1",
           str(TORCHRUN_SCRIPT), "--model", args.model, "--steps", str(args.steps),
           "--ckpt-every", str(args.steps), "--threads", str(args.threads), "--out", str(out),
           *(["--data", args.data] if args.data else [])]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1")
    started = time.time()
    with _process(cmd, workdir, "torchrun", env=env) as proc:
        _wait(proc, args.timeout, "torchrun", workdir / "torchrun.out")
    wall_s = time.time() - started
    first_step = float((out / "steps.log").read_text().splitlines()[0].split()[1])
    _pid, _process_unix, ready, _resumed = (out / "starts.log").read_text().split()
    return {"first_step_s": first_step - started, "ready_s": float(ready) - started,
            "started_s": None, "wall_s": wall_s}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    contenders = tuple(args.contenders)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    with tempfile.TemporaryDirectory(prefix="rebound-bench-startup-") as tmp:
        homes = {name: Path(tmp) / f"home-{name}" for name in REBOUND_ENV if name in contenders}
        try:
            runners: dict[str, Callable[[Path], dict[str, Any]]] = {
                "torchrun": lambda w: run_torchrun(args, w),
                **{name: (lambda w, n=name: run_rebound(args, w, n, homes[n]))
                   for name in homes}}
            for name in homes:  # the warm machine: database made, kept servers up
                workdir = Path(tmp) / f"{name}-prime"
                workdir.mkdir()
                primed = runners[name](workdir)
                print(f"primed {name}: first step {primed['first_step_s']:.2f} s",
                      file=sys.stderr)
            for round_no in range(args.rounds):
                order = contenders if round_no % 2 == 0 else contenders[::-1]
                for name in order:
                    workdir = Path(tmp) / f"{name}-{round_no}"
                    workdir.mkdir()
                    r = runners[name](workdir)
                    runs[name].append(r)
                    print(f"round {round_no + 1}/{args.rounds} {name}: first step "
                          f"{r['first_step_s']:.2f} s", file=sys.stderr)
        finally:
            for home in homes.values():
                stop_kept_coordinator(home)
                stop_kept_cluster(home)
                stop_kept_server(home / "prefect")
    rows = []
    for name in contenders:
        row: dict[str, Any] = {"method": name}
        for key in NUMERIC:
            with_spread(row, key, [r[key] for r in runs[name]], 2)
        rows.append(row)
    first = {r["method"]: r["first_step_s"] for r in rows}
    ratios: dict[str, float] = {}
    if "rebound_warm" in first:
        ratios["rebound_warm_first_step_s"] = first["rebound_warm"]
        if "torchrun" in first:
            ratios["rebound_warm_vs_torchrun_first_step"] = round(
                first["rebound_warm"] / first["torchrun"], 3)
        if "rebound_cold" in first:
            ratios["rebound_cold_vs_warm_first_step"] = round(
                first["rebound_cold"] / first["rebound_warm"], 3)
    return {"rows": rows, "ratios": ratios, "runs": runs}


def _contenders(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"{text!r}: a comma-separated list of distinct names among {', '.join(CONTENDERS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.startup", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="model preset (default small)")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per run (default 5)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, alternating order (default 3)")
    p.add_argument("--data", help="corpus (default: the stdlib's source)")
    p.add_argument("--contenders", type=_contenders, default=list(CONTENDERS),
                   help=f"which to run, comma-separated (default all: {','.join(CONTENDERS)})")
    p.add_argument("--timeout", type=float, default=600.0,
                   help="seconds one run may take (default 600)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    if min(args.steps, args.threads, args.rounds) < 1:
        p.error("--steps, --threads and --rounds must be >= 1")
    try:
        out = measure(args)
    except (BenchError, subprocess.TimeoutExpired) as e:
        print(f"bench.startup: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out))
        return 0
    print_table(f"bench.startup: {args.model}, {args.steps} steps, {args.threads} threads, "
                f"median (min-max) of {args.rounds} rounds", out["rows"], out["ratios"])
    return 0


if __name__ == "__main__":
    # SIGTERM unwinds like an exception, so the finally blocks stop what the bench started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
