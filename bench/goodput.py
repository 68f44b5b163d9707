"""bench.goodput: Rebound and torchrun training the same model under the same failures.

    python -m bench.goodput [--model small] [--steps 2200] [--kill-every 60] [--workers 1|2]

Both contenders train --steps steps of the same preset on the same data and seed, and a
training process of each is SIGKILLed by PID once in every --kill-every seconds of wall time,
counted from the contender's own start (start-up included for both): at a random moment of
each window (--kill-phase random, the default; seeded, the same moments for both contenders of
a round), or at its end (--kill-phase fixed). When nothing is training at a
kill time (the contender is still recovering from the last kill), the kill waits for the next
training process to appear. With --workers 2 both train data-parallel and the victim is rank 1.
Each runs at its best settings:
  rebound   `python -m flows.train --spares 1 --async-save --ckpt-every auto --mtbf KILL_EVERY`:
            a hot spare, peer restore (--workers 2), background saves (each rank its share
            with --workers 2; --rebound-saves sync: in line), the checkpoint interval
            from Young/Daly on its measured stall and the true failure interval. The victim is
            the worker process of the newest training attempt (--workers 2: rank 1's process,
            from the store's ranks/1 record). --rebound-cluster kept: Rebound trains on the Dask
            cluster kept between runs in a REBOUND_HOME of the bench's own, which one short,
            untimed, unkilled run starts first (a warm machine: a user's next run); the victim
            is then a descendant of that cluster's server instead of the run's process group.
  torchrun  `torchrun --max-restarts=1000 bench/torchrun_train.py --evaluate` (the same Trainer,
            torch.save + fsync + rename checkpoints, resume on restart, and the same evaluations
            as Rebound: at every epoch's end and the last step), its interval from Young/Daly too:
            sqrt(2 * C * MTBF) / step time, with C and the step time measured by this bench on
            the same preset before the runs (--torchrun-ckpt-every overrides it). The victim is
            the newest training process of rank 0 (--workers 2: rank 1) that is torchrun's child.

Rows (one per contender, median (min-max) over --rounds):
  wall_s        contender start to exit (start-up and every recovery included)
  productive_s  seconds of the training steps that survive into the final state (Rebound: its
                summary's productive_s; torchrun: the step seconds of the last execution of
                every step in its step log): the same definition for both
  ettr          productive_s / wall_s (effective training time ratio)
  steps_lost    steps trained again because a kill lost them (Rebound: the sum of its summary's
                lost_steps; torchrun: step executions logged minus --steps)
  failures      kills performed (--json: kills_s, when each came, from the contender's start;
                Rebound's summary_failures, the failures its own summary reports: a kill of a
                worker between tasks costs a restart but no training, and may not be one)
  ckpt_every    the checkpoint interval each used (Rebound: the one --ckpt-every auto chose)
  eval_s        seconds spent evaluating (both evaluate at the same steps; part of wall_s,
                never of productive_s)
--json's "runs" also carry Rebound's wall_breakdown (start-up, evaluation, checkpoint stall,
recovery, lost steps and orchestration, from its summary) and the interval --ckpt-every auto chose.
Ratios: rebound_vs_torchrun_ettr = Rebound's ettr / torchrun's (aim >= 1.0), and
torchrun_vs_rebound_wall = torchrun's wall_s / Rebound's (the same steps: > 1 means Rebound
finished first; a step slowed by background work counts as productive in ETTR, not here). The
table also says
whether both ended with the same state_hash (a lossless resume reaches the same bits), and how
fast the machine was around each run (bench/_machine.py: a round in which it moved by more
than 10% is flagged; --json: "machine", and each run's machine_gflops).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import random
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from bench._local_api import kept_api_stopped_after
from bench._machine import MachineSpeed, report_lines
from bench._table import print_table, with_spread
from bench.recovery import (
    TORCHRUN_SCRIPT,
    BenchError,
    _parent_pid,
    _process,
    _read_steps,
    _torchrun_cmd,
    _wait,
)

RUN_ID = "bench-goodput"
POLL_S = 0.05
NUMERIC = ("wall_s", "productive_s", "ettr", "steps_lost", "failures", "ckpt_every", "eval_s")


def _alive_in_group(pid: int, pgid: int) -> bool:
    """pid is a live process of the contender's process group (never a reused stranger's)."""
    try:
        return os.getpgid(pid) == pgid and Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


def kill_offsets(kill_every: float, phase: str, seed: int) -> Callable[[int], float]:
    """When the n-th kill (n >= 1) comes, in seconds from a contender's start.

    fixed: at n * kill_every. random: once in every window [(n-1) * kill_every, n * kill_every),
    at a moment drawn from `seed` and n alone, so both contenders of a round meet the same
    moments. Fixed times lock onto a contender's own rhythm (restart time, checkpoint
    interval): every kill then lands at the same point of its checkpoint cycle, and the steps
    lost say more about that phase than about the checkpoint policy.
    """
    if phase == "fixed":
        return lambda n: n * kill_every
    return lambda n: (n - 1 + random.Random(f"{seed}:{n}").random()) * kill_every


class Killer(threading.Thread):
    """SIGKILLs victim() at started + at(n) for n = 1, 2, ..., until stopped.

    victim() returns the PID to kill now, or None when nothing trains yet; a kill time with no
    victim waits for one (polling), so every interval costs the contender one training process.
    """

    def __init__(self, started: float, at: Callable[[int], float], victim: Callable[[], int | None]) -> None:
        super().__init__(daemon=True, name="goodput-killer")
        self._t0, self._at, self._victim = started, at, victim
        self._stop_event = threading.Event()
        self.kills: list[tuple[float, int]] = []

    def run(self) -> None:
        n = 1
        while not self._stop_event.wait(max(0.0, self._t0 + self._at(n) - time.time())):
            killed = {pid for _, pid in self.kills}
            while not self._stop_event.is_set():
                pid = self._victim()
                if pid is not None and pid not in killed:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                    self.kills.append((time.time(), pid))
                    break
                self._stop_event.wait(POLL_S)
            n += 1

    def stop(self) -> None:
        self._stop_event.set()
        self.join()


def _run_under_kills(args: argparse.Namespace, cmd: list[str], workdir: Path, name: str, label: str,
                     victim_for: Callable[[int], Callable[[], int | None]], started: float,
                     env: dict[str, str] | None = None) -> Killer:
    """Run a contender to its end while a Killer strikes victim_for(its PID) on schedule."""
    with _process(cmd, workdir, name, env=env) as proc:
        killer = Killer(started, kill_offsets(args.kill_every, args.kill_phase, args.seed), victim_for(proc.pid))
        killer.start()
        try:
            _wait(proc, args.timeout, label, workdir / f"{name}.out")
        finally:
            killer.stop()
    return killer


# ---- Rebound ------------------------------------------------------------------------------

def _alive_under(pid: int, ancestor: int) -> bool:
    """pid is a live descendant of `ancestor` (the kept cluster's server: its workers are the
    children of its forkserver, in the server's process group, not the contender's)."""
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
    except (OSError, IndexError):
        return False
    seen = pid
    for _ in range(8):  # worker -> forkserver -> server: a few generations at most
        parent = _parent_pid(seen)
        if parent is None or parent <= 1:
            return False
        if parent == ancestor:
            return True
        seen = parent
    return False


def _rebound_victim(store_dir: Path, pgid: int, workers: int,
                    kept_home: Path | None = None) -> Callable[[], int | None]:
    from storage import open_store

    def victim() -> int | None:
        store = open_store(str(store_dir))
        try:
            if workers > 1:
                doc = store.read_json(RUN_ID, "ranks/1")
                pid = doc.get("pid") if doc else None
            else:
                attempts = [d for _, d in store.list_json(RUN_ID, "attempts")]
                pid = max(attempts, key=lambda d: d["started_unix"])["pid"] if attempts else None
        except (OSError, ValueError, KeyError):
            return None  # a record being written: try again at the next poll
        if pid is None:
            return None
        if kept_home is not None:
            from flows.kept_cluster import read_record

            record = read_record(kept_home)
            return int(pid) if record and _alive_under(int(pid), int(record["pid"])) else None
        return int(pid) if _alive_in_group(int(pid), pgid) else None

    return victim


def _rebound_cmd(args: argparse.Namespace, store_dir: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "flows.train", "--no-progress", "--model", args.model,
            "--steps", str(steps), "--group-steps", str(args.group_steps),
            "--workers", str(args.workers), "--spares", "1",
            "--async-save", "on" if args.rebound_saves == "async" else "off",
            "--ckpt-every", "auto", "--mtbf", f"{args.kill_every:g}s", "--threads",
            str(args.threads), "--store", str(store_dir), "--run-id", RUN_ID, "--fresh",
            *(["--data", args.data] if args.data else [])]


def _kept_env(home: Path) -> dict[str, str]:
    """Rebound's runs with --rebound-cluster kept: the Dask cluster (and Prefect API) kept in
    the bench's own REBOUND_HOME, the same environment for every run (the cluster's key)."""
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_HOME"}  # its own, in home
    return {**env, "REBOUND_HOME": str(home), "REBOUND_CLUSTER_IDLE": "30m",
            "REBOUND_COORDINATOR_IDLE": "30m"}


def prime_kept_cluster(args: argparse.Namespace, home: Path, workdir: Path) -> None:
    """One short run, not timed and never killed, that leaves the kept cluster (and API) up:
    the timed runs find a warm machine, as a user's next run does."""
    workdir.mkdir(parents=True)
    with _process(_rebound_cmd(args, workdir / "store", 2), workdir, "prime",
                  env=_kept_env(home)) as proc:
        _wait(proc, args.timeout, "rebound (priming run)", workdir / "prime.out")


def run_rebound(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    store_dir, summary_path = workdir / "store", workdir / "summary.json"
    kept_home = Path(args.kept_home) if args.rebound_cluster == "kept" else None
    cmd = [*_rebound_cmd(args, store_dir, args.steps), "--summary-json", str(summary_path)]
    started = time.time()
    killer = _run_under_kills(
        args, cmd, workdir, "rebound", "rebound (python -m flows.train)",
        lambda pgid: _rebound_victim(store_dir, pgid, args.workers, kept_home), started,
        env=_kept_env(kept_home) if kept_home is not None else None)
    wall_s = time.time() - started
    s = json.loads(summary_path.read_text())
    return {
        "wall_s": wall_s, "productive_s": float(s["productive_s"]),
        "ettr": float(s["productive_s"]) / wall_s,
        "steps_lost": sum(int(f.get("lost_steps") or 0) for f in s.get("failures", [])),
        "failures": len(killer.kills), "ckpt_every": (s.get("ckpt_auto") or {}).get("every"),
        "summary_failures": len(s.get("failures", [])),
        "summary_failure_kinds": [(f.get("kind"), f.get("step"), f.get("lost_steps")) for f in s.get("failures", [])],
        "kills_s": [round(t - started, 2) for t, _ in killer.kills],
        "state_hash": s.get("state_hash"), "status": s.get("status"),
        "eval_s": (s.get("wall_breakdown") or {}).get("eval_s"),
        # Where Rebound's own clock put its wall time (it starts after the bench's does).
        "wall_breakdown": s.get("wall_breakdown"), "ckpt_auto": s.get("ckpt_auto"),
    }


# ---- torchrun -----------------------------------------------------------------------------

def measure_torchrun_costs(args: argparse.Namespace) -> tuple[float, float]:
    """(seconds of one torch.save checkpoint, seconds of one step) of the preset, measured here
    the way the script does them (median of 3 saves; mean of 5 steps after 2 warm-up steps)."""
    import torch

    from bench.torchrun_train import save_checkpoint
    from training.config import TrainConfig
    from training.data import load_corpus
    from training.loop import Trainer

    torch.set_num_threads(args.threads)
    cfg = TrainConfig(model=args.model, steps=args.steps, torch_threads=args.threads, device="cpu").resolved()
    trainer = Trainer(cfg, load_corpus(args.data), device="cpu")
    for _ in range(2):
        trainer.train_step()
    step_s = statistics.mean(trainer.train_step().seconds for _ in range(5))
    with tempfile.TemporaryDirectory(prefix="rebound-bench-goodput-probe-") as d:
        saves = []
        for _ in range(3):
            t0 = time.perf_counter()
            save_checkpoint(trainer, Path(d) / "ckpt.pt")
            saves.append(time.perf_counter() - t0)
    return statistics.median(saves), step_s


def young_daly_steps(ckpt_s: float, mtbf_s: float, step_s: float, max_steps: int) -> int:
    """sqrt(2 C M) in steps, clamped to [1, max_steps]."""
    return max(1, min(max_steps, round(math.sqrt(2.0 * ckpt_s * mtbf_s) / step_s)))


def _torchrun_victim(out: Path, agent_pid: int, rank: int) -> Callable[[], int | None]:
    def victim() -> int | None:
        try:
            lines = (out / "ranks.log").read_text().splitlines()
        except FileNotFoundError:
            return None
        pids = [int(p) for r, p in (ln.split() for ln in lines if ln.count(" ") == 1) if int(r) == rank]
        pid = pids[-1] if pids else None
        return pid if pid is not None and _parent_pid(pid) == agent_pid else None

    return victim


def _eval_seconds(log: Path) -> float:
    """Seconds torchrun's rank 0 spent evaluating, every evaluation counted (a repeated one
    too: its time was spent)."""
    try:
        return round(sum(float(ln.split()[2]) for ln in log.read_text().splitlines() if ln.strip()), 3)
    except FileNotFoundError:
        return 0.0


def run_torchrun(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    out = workdir / "out"
    out.mkdir()
    every = args.torchrun_ckpt_every
    cmd = [*_torchrun_cmd(), "--standalone", f"--nproc-per-node={args.workers}", "--max-restarts=1000",
           "--local-addr", "127.0.0.1", str(TORCHRUN_SCRIPT), "--model", args.model,
           "--steps", str(args.steps), "--ckpt-every", str(every), "--threads", str(args.threads),
           "--out", str(out), "--evaluate", *(["--data", args.data] if args.data else [])]
    started = time.time()
    killer = _run_under_kills(args, cmd, workdir, "torchrun", "torchrun",
                              lambda agent: _torchrun_victim(out, agent, args.workers - 1), started,
                              env=dict(os.environ, MASTER_ADDR="127.0.0.1"))
    wall_s = time.time() - started
    steps = _read_steps(out / "steps.log")
    surviving = {s.step: s.seconds for s in steps}  # in time order: the last execution wins
    final = json.loads((out / "final.json").read_text())
    productive = sum(surviving.values())
    return {
        "wall_s": wall_s, "productive_s": productive, "ettr": productive / wall_s,
        "steps_lost": len(steps) - len(surviving), "failures": len(killer.kills), "ckpt_every": every,
        "summary_failures": None, "summary_failure_kinds": None,
        "kills_s": [round(t - started, 2) for t, _ in killer.kills], "state_hash": final["state_hash"],
        "eval_s": _eval_seconds(out / "evals.log"),
        "status": "completed" if final["final_step"] == args.steps else "incomplete",
    }


# ---- driver -------------------------------------------------------------------------------

CONTENDERS: dict[str, Callable[[argparse.Namespace, Path], dict[str, Any]]] = {
    "rebound": run_rebound, "torchrun": run_torchrun,
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.goodput", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="model preset (default small)")
    p.add_argument("--steps", type=int, default=2200, help="optimizer steps (default 2200)")
    p.add_argument("--kill-every", type=float, default=60.0,
                   help="seconds between kills, from each contender's start (default 60)")
    p.add_argument("--kill-phase", choices=("random", "fixed"), default="random",
                   help="random (default): one kill in every --kill-every window, at a seeded "
                        "random moment inside it, the same moments for both contenders; fixed: "
                        "at every multiple of --kill-every (locks onto each contender's "
                        "checkpoint cycle, so its steps lost depend on that phase)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the random kill moments (round r uses seed + r; default 0)")
    p.add_argument("--workers", type=int, default=1, choices=(1, 2),
                   help="training processes per contender: 1, or 2 data-parallel ranks (rank 1 killed)")
    p.add_argument("--group-steps", type=int, default=50, help="Rebound steps per batch group (default 50)")
    p.add_argument("--rebound-saves", choices=("async", "sync"), default="async",
                   help="Rebound's saves: in the background (default) or in line. On a machine "
                        "whose cores all train, a background save slows the steps it overlaps "
                        "by more than an in-line save stalls them (see the README)")
    p.add_argument("--rebound-cluster", choices=("own", "kept"), default="own",
                   help="own (default): every Rebound run starts its cluster, as with "
                        "REBOUND_CLUSTER_IDLE=0; kept: Rebound trains on the Dask cluster kept "
                        "between runs (flows/kept_cluster.py), primed by one short untimed run, "
                        "as on a warm machine (its start-up ~5 s instead of ~14 s)")
    p.add_argument("--torchrun-ckpt-every", type=int, default=None,
                   help="torchrun's checkpoint interval in steps (default: Young/Daly, measured)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process (default 2; 1 per rank with --workers 2)")
    p.add_argument("--rounds", type=int, default=1, help="rounds, order alternating (default 1)")
    p.add_argument("--contenders", default="rebound,torchrun",
                   help="which contenders run, comma-separated (default rebound,torchrun; the "
                        "ratios need both)")
    p.add_argument("--data", help="corpus (default: the stdlib's source)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds one run may take (default 3600)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = 2 if args.workers == 1 else 1
    if min(args.steps, args.group_steps, args.threads, args.rounds) < 1 or args.kill_every <= 0:
        p.error("--steps, --group-steps, --threads, --rounds must be >= 1 and --kill-every > 0")
    if args.torchrun_ckpt_every is not None and args.torchrun_ckpt_every < 1:
        p.error("--torchrun-ckpt-every must be >= 1")
    args.contenders = [n.strip() for n in args.contenders.split(",") if n.strip()]
    if not args.contenders or len(set(args.contenders)) != len(args.contenders) or \
            not set(args.contenders) <= {"rebound", "torchrun"}:
        p.error("--contenders: a comma-separated list of distinct names among rebound, torchrun")
    return args


@contextlib.contextmanager
def _kept_cluster(args: argparse.Namespace, tmp: Path) -> Iterator[None]:
    """With --rebound-cluster kept: a REBOUND_HOME of the bench's own whose kept cluster (and
    API) a priming run starts, both stopped by PID at the end, also on failure."""
    args.kept_home = None
    if args.rebound_cluster != "kept":
        yield
        return
    from flows.kept_api import stop_kept_server
    from flows.kept_cluster import stop_kept_cluster
    from flows.kept_coordinator import stop_kept_coordinator

    home = tmp / "rebound-home"
    args.kept_home = str(home)
    try:
        prime_kept_cluster(args, home, tmp / "prime")
        yield
    finally:
        stop_kept_coordinator(home)
        stop_kept_cluster(home)
        stop_kept_server(home / "prefect")


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    probe = None
    contenders = {name: CONTENDERS[name] for name in args.contenders}
    if "torchrun" in contenders and args.torchrun_ckpt_every is None:
        ckpt_s, step_s = measure_torchrun_costs(args)
        args.torchrun_ckpt_every = young_daly_steps(ckpt_s, args.kill_every, step_s, args.steps)
        probe = {"torchrun_ckpt_s": ckpt_s, "step_s": step_s, "torchrun_ckpt_every": args.torchrun_ckpt_every}
        if not args.json:
            print(f"torchrun: torch.save checkpoint {ckpt_s:.3f} s, step {step_s:.3f} s -> "
                  f"Young/Daly interval {args.torchrun_ckpt_every} steps", file=sys.stderr)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    speed = MachineSpeed()
    with tempfile.TemporaryDirectory(prefix="rebound-bench-goodput-") as tmp, \
            _kept_cluster(args, Path(tmp)):
        for round_no in range(args.rounds):
            order = list(contenders) if round_no % 2 == 0 else list(reversed(contenders))
            for name in order:
                workdir = Path(tmp) / f"{name}-{round_no}"
                workdir.mkdir()
                run_args = argparse.Namespace(**{**vars(args), "seed": args.seed + round_no})
                try:
                    r = speed.around(round_no, functools.partial(contenders[name], run_args, workdir))
                except BenchError as e:
                    print(f"bench.goodput: round {round_no + 1} {name}: {e}", file=sys.stderr)
                    r = {**dict.fromkeys(NUMERIC), "summary_failures": None, "kills_s": None, "state_hash": None,
                         "status": f"failed: {str(e).splitlines()[-1]}"}
                results[name].append(r)
                if not args.json and r["wall_s"] is not None:
                    print(f"round {round_no + 1}/{args.rounds} {name}: wall {r['wall_s']:.1f} s, "
                          f"ETTR {r['ettr']:.3f}, {r['failures']} kills, {r['steps_lost']} steps lost",
                          file=sys.stderr)
    rows = []
    for name, runs in results.items():
        row: dict[str, Any] = {"method": name}
        for key in NUMERIC:
            with_spread(row, key, [r[key] for r in runs], 4 if key == "ettr" else 2)
        row["failed_runs"] = sum(str(r["status"]).startswith("failed") for r in runs)
        rows.append(row)
    by = {r["method"]: r for r in rows}
    ratios = {}
    if len(by) == 2 and by["rebound"]["ettr"] and by["torchrun"]["ettr"]:
        ratios["rebound_vs_torchrun_ettr"] = round(by["rebound"]["ettr"] / by["torchrun"]["ettr"], 4)
        # The same steps done: a step slowed by a save's background work still counts as
        # productive in ETTR, never in the wall time.
        ratios["torchrun_vs_rebound_wall"] = round(by["torchrun"]["wall_s"] / by["rebound"]["wall_s"], 4)
    hashes = {r["state_hash"] for runs in results.values() for r in runs if r["state_hash"]}
    failed = sum(r["failed_runs"] for r in rows)
    if args.json:
        print(json.dumps({"rows": rows, "ratios": ratios, "runs": results, "probe": probe,
                          "kills": {"every_s": args.kill_every, "phase": args.kill_phase, "seed": args.seed},
                          "machine": speed.report(),
                          "same_state_hash": len(hashes) == 1}))
    else:
        print_table(f"bench.goodput: {args.model}, {args.steps} steps, a kill every {args.kill_every:g} s "
                    f"({args.kill_phase} phase), "
                    f"{args.workers} process(es) x {args.threads} thread(s), median (min-max) of "
                    f"{args.rounds} round(s)", rows, ratios)
        print("final state_hash: " + ("identical in every run" if len(hashes) == 1
                                      else f"DIFFERS between runs: {sorted(map(str, hashes))}"))
        print("\n".join(report_lines(speed.report())))
    return 1 if failed else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with kept_api_stopped_after():
            status = main()
        sys.exit(status)
    except KeyboardInterrupt:
        print("bench.goodput: interrupted", file=sys.stderr)
        sys.exit(130)
