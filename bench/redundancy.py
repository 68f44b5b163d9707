"""bench.redundancy: what a spare buys at a rank's death, and what replicas and votes cost.

Every contender is `python -m flows.train` on the same model preset, data, steps, groups and
checkpoint interval, one torch thread per worker (--threads; workers x threads <= cores), all
sharing one Prefect server that the bench starts (or the PREFECT_API_URL you set). They run one
after the other (never together), every contender once per round, in reversed order every other
round.

Recovery contenders: two data-parallel ranks (--workers 2), rank 1 SIGKILLed by chaos as it
starts step K+1 (`--chaos kill-worker@K+1/1`, K = --kill-after), measured exactly as
bench.recovery measures its dp2 case (its run_rebound):
  hot_spare   --spares 1 --standby hot: a warm spare worker waits; it takes rank 1 and gets the
              survivor's state from its memory
  cold_spare  --spares 1 --standby cold: no spare process until the loss is detected, then the
              cluster is asked for a worker (which pays its start-up: Python, torch, Prefect)
  no_spare    --spares 0: nobody waits; the group re-forms once the nanny has restarted the
              killed worker
Their numbers:
  recovery_s   kill -> the first step completed after it (the first `first_step_unix` of an
               attempt that started after the kill minus the kill's `fired_unix`)
  detected_s   kill -> the retried attempt started;  ready_s: kill -> its state restored
  steps_lost   completed steps trained again (0 when the state came from the surviving peer)
  step_s       steady-state step time (bench.recovery: productive_s over the last intervals)
  wall_s       the whole run, process start to exit
  replacement_s       the summary's failure entry: a new worker asked for -> joined (cold only)
  summary_recovered_s, summary_lost_steps   the same failure entry, as a cross-check

Steady contenders: one rank per replica group (--workers 1), no failure, on a cluster of two
workers in every case:
  replicas1        --replicas 1 --spares 1 --standby hot: one worker trains, the other is an
                   idle hot spare
  replicas2        --replicas 2 --spares 0: both workers train the same steps (policy first:
                   a group's result is the first replica's to finish)
  vote_every_step  --replicas 2 --spares 0 --replica-policy vote --vote-every 1
  vote_default     --replicas 2 --spares 0 --replica-policy vote (votes at checkpoints and
                   group ends only)
Their numbers (useful tokens: steps x the global batch's tokens, counted once however many
replicas trained them, as the summary counts one result per group):
  tokens_per_s      useful tokens / window_s
  window_s          the training window: the run's wall_s minus its startup_s (the summary's
                    wall_breakdown), i.e. from the first group's submission to the end. It holds
                    all that replication adds (contention between the replicas' cores, start
                    state agreement, votes, the writer's commit awaited by the others) and the
                    same evaluation and checkpoints for every contender; the cluster's start-up
                    is left out (the same two workers start in every case)
  step_tokens_per_s useful tokens / train_s (the summary's productive_s: the steps' own
                    seconds, votes and orchestration excluded)
  step_s            train_s / steps
  votes, vote_s     the summary's replication entry: votes taken, and the seconds of the
                    slowest rank spent voting (hashing its state, posting the hash, waiting for
                    every replica's hash and comparing: the wait for the slower replica counts)
  vote_s_per_vote   vote_s / votes
  vote_per_step     (vote_s / votes) / step_s: one vote's cost as a fraction of one step
  vote_amortized    (vote_s / steps trained) / step_s: the voting cost the cadence adds per step
  vote_wait_s       of vote_s, the seconds spent waiting for the other replica's hash (only the
                    writer before a commit and everyone at a group's end wait; other votes post
                    and go on, compared once the other replica's hash is there)
  vote_own_per_step ((vote_s - vote_wait_s) / votes) / step_s: a vote's own work (hash, post,
                    compare) as a fraction of one step
Ratios (of medians):
  cold_vs_hot_recovery_time       cold_spare recovery_s / hot_spare recovery_s
  no_spare_vs_hot_recovery_time   no_spare recovery_s / hot_spare recovery_s
  replicas2_vs_1_throughput       replicas2 tokens_per_s / replicas1 tokens_per_s (ideal 1:
                                  the second worker was idle anyway)
  replicas2_vs_1_step_throughput  the same for step_tokens_per_s
  vote_cost_fraction              vote_every_step's vote_per_step (waits included)
  vote_own_cost_fraction          vote_every_step's vote_own_per_step (aim < 0.01)
  vote_cost_fraction_default_cadence  vote_default's vote_amortized
  failed_runs  rounds of a contender that did not complete (left out of its medians; the exit
               status is then 1, after the table)
Where one vote's time goes (--json "vote_breakdown", printed under the tables):
  hash_s           hashing the preset's whole training state once (tasks/rank_runner.py's
                   state hash of weights and optimizer), measured apart in this process after
                   the runs, on --threads threads: the vote's own work (median of 10)
  vote_s_per_vote  vote_every_step's median (above)
  rest_s           vote_s_per_vote - hash_s: posting and polling the coordinator's board and
                   waiting for the other replica to reach the same step
--json prints {"rows": [...], "ratios": {...}, "vote_breakdown": {...},
"runs": {contender: [numbers per round, state_hash and status included]}}.
--workdir keeps every run's store, summary and output (flow.out or rebound-*.out) for a look.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import signal
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench._table import print_table, with_spread
from bench.recovery import BenchError, _process, _wait, run_rebound
from bench.scaling import _tokens_per_step

RUN_ID = "bench-redundancy"
RECOVERY_NUMERIC = ("recovery_s", "detected_s", "ready_s", "steps_lost", "step_s", "wall_s",
                    "replacement_s", "summary_recovered_s", "summary_lost_steps")
TABLE_WIDTH = 260
"""Columns wide enough for "median (min-max)" of every number on one line."""
STEADY_NUMERIC = ("tokens_per_s", "window_s", "step_tokens_per_s", "step_s", "wall_s", "votes",
                  "vote_s", "vote_s_per_vote", "vote_per_step", "vote_amortized", "vote_wait_s",
                  "vote_own_per_step")


def run_recovery(args: argparse.Namespace, workdir: Path, spares: int, standby: str
                 ) -> dict[str, Any]:
    """bench.recovery's Rebound run with this standby; plus what its summary says of the kill."""
    numbers = run_rebound(args, workdir, spares, extra_args=("--standby", standby))
    summary = json.loads((workdir / "summary.json").read_text())
    killed = [f for f in summary.get("failures", [])
              if f["kind"] in ("kill-worker", "worker-lost") and f["step"] == args.kill_after + 1]
    numbers["replacement_s"] = next((f["replacement_s"] for f in killed if "replacement_s" in f),
                                    None)
    numbers["restored_from"] = killed[0].get("restored_from") if killed else None
    return numbers


def run_steady(args: argparse.Namespace, workdir: Path, flags: Sequence[str]) -> dict[str, Any]:
    """One failure-free `flows.train --workers 1` run with `flags`; its throughput and votes."""
    summary_path = workdir / "summary.json"
    cmd = [sys.executable, "-m", "flows.train", "--no-progress", "--model", args.model,
           "--steps", str(args.steps), "--group-steps", str(args.group_steps),
           "--ckpt-every", str(args.ckpt_every), "--workers", "1", "--threads", str(args.threads),
           "--store", str(workdir / "store"), "--run-id", RUN_ID, "--fresh",
           "--summary-json", str(summary_path), *(["--data", args.data] if args.data else []),
           *flags]
    with _process(cmd, workdir, "flow") as proc:
        _wait(proc, args.timeout, f"python -m flows.train {' '.join(flags)}", workdir / "flow.out")
    summary = json.loads(summary_path.read_text())
    if summary.get("status") != "completed" or summary.get("final_step") != args.steps:
        raise BenchError(f"run ended {summary.get('status')} at step "
                         f"{summary.get('final_step')}: {summary.get('reason')}")
    tokens = args.steps * _tokens_per_step(args.model, args.steps)
    train_s = float(summary["productive_s"])
    window_s = float(summary["wall_s"]) - float(summary["wall_breakdown"]["startup_s"])
    step_s = train_s / args.steps
    repl = summary.get("replication") or {}
    votes, vote_s = repl.get("votes") or 0, repl.get("vote_s")
    wait_s = repl.get("vote_wait_s")
    per_vote = vote_s / votes if votes else None
    trained = repl.get("steps_trained") or args.steps
    return {
        "tokens_per_s": tokens / window_s,
        "window_s": window_s,
        "step_tokens_per_s": tokens / train_s,
        "step_s": step_s,
        "wall_s": float(summary["wall_s"]),
        "votes": votes if repl else None,
        "vote_s": vote_s,
        "vote_s_per_vote": per_vote,
        "vote_per_step": None if per_vote is None else per_vote / step_s,
        "vote_amortized": None if vote_s is None or not votes else vote_s / trained / step_s,
        "vote_wait_s": wait_s,
        "vote_own_per_step": None if vote_s is None or wait_s is None or not votes
        else (vote_s - wait_s) / votes / step_s,
        "state_hash": summary.get("state_hash"),
        "status": summary["status"],
    }


def measure_hash_s(args: argparse.Namespace, reps: int = 10) -> float:
    """Median seconds to hash the preset's whole training state (weights and optimizer), as a
    rank does at each vote (tasks/rank_runner.py), in this process on --threads threads: the
    vote's own work, with no replica to wait for."""
    import time

    import torch

    from storage.hashing import state_hash
    from training.config import TrainConfig
    from training.data import load_corpus
    from training.loop import Trainer

    torch.set_num_threads(args.threads)
    cfg = TrainConfig(model=args.model, steps=10, torch_threads=args.threads,
                      device="cpu").resolved()
    trainer = Trainer(cfg, load_corpus(args.data), device="cpu")
    trainer.train_step()  # the optimizer's moments exist now, as at any vote
    times = []
    for i in range(reps + 1):
        started = time.perf_counter()
        state_hash(trainer.capture()[0])
        if i:  # the first call warms the caches
            times.append(time.perf_counter() - started)
    return statistics.median(times)


Contender = Callable[[argparse.Namespace, Path], dict[str, Any]]
RECOVERY: dict[str, Contender] = {
    "hot_spare": functools.partial(run_recovery, spares=1, standby="hot"),
    "cold_spare": functools.partial(run_recovery, spares=1, standby="cold"),
    "no_spare": functools.partial(run_recovery, spares=0, standby="hot"),
}
STEADY: dict[str, Contender] = {
    "replicas1": functools.partial(run_steady, flags=("--replicas", "1", "--spares", "1",
                                                      "--standby", "hot")),
    "replicas2": functools.partial(run_steady, flags=("--replicas", "2", "--spares", "0")),
    "vote_every_step": functools.partial(run_steady, flags=(
        "--replicas", "2", "--spares", "0", "--replica-policy", "vote", "--vote-every", "1")),
    "vote_default": functools.partial(run_steady, flags=("--replicas", "2", "--spares", "0",
                                                         "--replica-policy", "vote")),
}


def _row(method: str, runs: list[dict[str, Any]], numeric: Sequence[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"method": method}
    for key in numeric:
        # Fractions of a step can be far below 1e-3: keep their significant digits.
        with_spread(row, key, [r.get(key) for r in runs],
                    6 if key.startswith("vote") else 1 if "tokens" in key else 3)
    row["failed_runs"] = sum(str(r["status"]).startswith("failed") for r in runs)
    return row


def _ratio(num: float | None, den: float | None) -> float | None:
    if not num or not den:
        return None  # a contender whose every round failed has no median
    return float(f"{num / den:.4g}")


def ratios_of(by: dict[str, dict[str, Any]]) -> dict[str, float]:
    """The named ratios of medians; one is left out when a median it needs is missing."""
    pairs = {
        "cold_vs_hot_recovery_time": (by["cold_spare"]["recovery_s"], by["hot_spare"]["recovery_s"]),
        "no_spare_vs_hot_recovery_time": (by["no_spare"]["recovery_s"],
                                          by["hot_spare"]["recovery_s"]),
        "replicas2_vs_1_throughput": (by["replicas2"]["tokens_per_s"],
                                      by["replicas1"]["tokens_per_s"]),
        "replicas2_vs_1_step_throughput": (by["replicas2"]["step_tokens_per_s"],
                                           by["replicas1"]["step_tokens_per_s"]),
        "vote_cost_fraction": (by["vote_every_step"]["vote_per_step"], 1.0),
        "vote_own_cost_fraction": (by["vote_every_step"]["vote_own_per_step"], 1.0),
        "vote_cost_fraction_default_cadence": (by["vote_default"]["vote_amortized"], 1.0),
    }
    out = {name: _ratio(*pair) for name, pair in pairs.items()}
    return {name: value for name, value in out.items() if value is not None}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.redundancy", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="model preset (default small)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps (default 30)")
    p.add_argument("--ckpt-every", type=int, default=10,
                   help="checkpoint interval in steps (default 10)")
    p.add_argument("--group-steps", type=int, default=15,
                   help="optimizer steps per batch group (default 15)")
    p.add_argument("--kill-after", type=int, default=18,
                   help="recovery: rank 1 dies as it starts step K+1 (default 18)")
    p.add_argument("--workers", type=int, default=2, choices=(1, 2),
                   help="recovery: data-parallel ranks (default 2; 1 kills the only rank)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    p.add_argument("--rounds", type=int, default=3,
                   help="repeat every contender, reversing the order every other round; the "
                        "table shows medians and their range (default 3)")
    p.add_argument("--data", help="corpus (default: the stdlib's source)")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds one run may take before it is stopped (default 900)")
    p.add_argument("--workdir", help="keep every run's store, summary and output here (an "
                                     "empty folder; default: a temporary one, removed)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = p.parse_args(argv)
    if min(args.steps, args.ckpt_every, args.group_steps, args.threads, args.rounds) < 1:
        p.error("--steps, --ckpt-every, --group-steps, --threads and --rounds must be >= 1")
    if not 1 <= args.kill_after < args.steps:
        p.error("--kill-after must be in [1, steps): a step must remain after the kill")
    if args.steps < 2 * args.ckpt_every:
        p.error("--steps must be >= 2 x --ckpt-every: step_s needs two checkpoint intervals")
    return args


def _run_rounds(args: argparse.Namespace, tmp: Path) -> dict[str, list[dict[str, Any]]]:
    contenders = {**RECOVERY, **STEADY}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    for round_no in range(args.rounds):
        order = list(contenders) if round_no % 2 == 0 else list(reversed(contenders))
        for name in order:
            workdir = tmp / f"{name}-{round_no}"
            workdir.mkdir(parents=True)
            try:
                results[name].append(contenders[name](args, workdir))
            except BenchError as e:
                # A failed round is kept as failed: the other contenders' numbers still count.
                print(f"bench.redundancy: round {round_no + 1} {name}: {e}", file=sys.stderr)
                results[name].append({"status": f"failed: {str(e).splitlines()[-1]}"})
                continue
            r = results[name][-1]
            print(f"round {round_no + 1}/{args.rounds} {name}: " +
                  (f"recovery {r['recovery_s']:.2f} s" if name in RECOVERY else
                   f"{r['tokens_per_s']:.0f} tokens/s"), file=sys.stderr)
    return results


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    # One Prefect server for every run (each flows.train would otherwise start its own, ~10-40 s
    # of start-up apiece); none when PREFECT_API_URL is set already (a real server, the tests').
    from flows.prefect_env import local_prefect_server, prepare_environment

    api = prepare_environment(keep_api=False)  # the bench stops what it starts
    # And its runs keep no cluster nor coordinator: each run's processes are its own.
    os.environ.setdefault("REBOUND_CLUSTER_IDLE", "0")
    os.environ.setdefault("REBOUND_COORDINATOR_IDLE", "0")
    with local_prefect_server(api), contextlib.ExitStack() as stack:
        tmp = args.workdir or stack.enter_context(
            tempfile.TemporaryDirectory(prefix="rebound-bench-redundancy-"))
        results = _run_rounds(args, Path(tmp))
    recovery = [_row(name, results[name], RECOVERY_NUMERIC) for name in RECOVERY]
    steady = [_row(name, results[name], STEADY_NUMERIC) for name in STEADY]
    ratios = ratios_of({r["method"]: r for r in recovery + steady})
    # The vote's own work, measured apart after the runs: what is left of a vote is waiting.
    per_vote = steady[list(STEADY).index("vote_every_step")]["vote_s_per_vote"]
    hash_s = measure_hash_s(args)
    breakdown = {"hash_s": round(hash_s, 6), "vote_s_per_vote": per_vote,
                 "rest_s": None if per_vote is None else round(per_vote - hash_s, 6)}
    failed = sum(r["failed_runs"] for r in recovery + steady)
    if args.json:
        print(json.dumps({"rows": recovery + steady, "ratios": ratios,
                          "vote_breakdown": breakdown, "runs": results}))
        return 1 if failed else 0
    common = (f"{args.model}, {args.steps} steps, ckpt every {args.ckpt_every}, group "
              f"{args.group_steps}, {args.threads} thread(s) per worker, median (min-max) of "
              f"{args.rounds} round(s)")
    print_table(f"bench.redundancy recovery: --workers {args.workers}, rank "
                f"{args.workers - 1} killed starting step {args.kill_after + 1}; {common}",
                recovery, {}, width=TABLE_WIDTH)
    print_table(f"bench.redundancy replicas and votes: --workers 1, 2 workers; {common}",
                steady, ratios, width=TABLE_WIDTH)
    print("one vote (vote_every_step): " + ", ".join(f"{k} {v}" for k, v in breakdown.items()))
    for name, runs in results.items():
        for i, r in enumerate(runs):
            if str(r["status"]).startswith("failed"):
                print(f"{name} round {i + 1}: {r['status']}")
    # Exact recovery and bit-identical replicas (DESIGN.md section 8): one hash per group.
    for kind, names in (("recovery", RECOVERY), ("steady", STEADY)):
        hashes = {r.get("state_hash") for name in names for r in results[name]} - {None}
        print(f"{kind} runs' final state_hash: " +
              ("all equal" if len(hashes) == 1 else f"{len(hashes)} different"))
    return 1 if failed else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench.redundancy: interrupted", file=sys.stderr)
        sys.exit(130)
