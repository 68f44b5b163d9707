"""bench.scaling: tokens/s of one model trained by one rank and by two data-parallel ranks.

Both contenders run `python -m flows.train --workers W --spares 0 --threads 1` (one torch thread
per worker, so two ranks use two cores where one rank uses one) on the same model preset, data,
steps and global batch (with W = 2 each rank takes half of every batch and the gradients are
averaged with one gloo all_reduce per step). They run one after the other, never together, in
alternating order per round.

Rows (one per contender; each number is the median over --rounds rounds, with its min and max
beside it in the table and as NAME_min / NAME_max in --json):
  tokens_per_s   tokens trained / train_s: the steady-state training rate (start-up,
                 evaluation, checkpoints and orchestration excluded)
  tokens         steps x global batch x block: the same for both contenders
  train_s        the summary's productive_s: the sum of the optimizer steps' own seconds
                 (StepResult.seconds; with two ranks the slower rank of each group, its
                 all_reduce waits included)
  step_s         train_s / steps
  e2e_tokens_per_s  tokens / (wall_s - startup_s): the rate once training has started,
                 evaluation, checkpoints and orchestration included
  wall_s, startup_s, eval_s, checkpoint_stall_s, orchestration_s
                 the summary's wall_breakdown (orchestration_s: between groups, task
                 submission, results; with two ranks also the rendezvous of every group)
  orchestration_per_group_s  orchestration_s / batch groups (Prefect + Dask + rendezvous per task)
Ratios (of medians):
  workers2_vs_1_throughput      workers2 tokens_per_s / workers1 tokens_per_s (ideal 2, aim >= 1.7)
  workers2_vs_1_e2e_throughput  the same for e2e_tokens_per_s
Where the rest goes (--json "dp_overhead", printed under the table), per optimizer step:
  ideal_step_s      workers1 step_s / 2 (half the batch per rank, nothing else)
  extra_step_s      workers2 step_s - ideal_step_s
  allreduce_s       one average_gradients (training/distributed.py) of the model's gradients
                    between two real gloo ranks of one thread each, measured apart (median of
                    --allreduce-reps calls after two warm-up calls)
  other_step_s      extra_step_s - allreduce_s: what two processes on two cores cost beyond
                    the collective (uneven halves, shared caches and memory bandwidth)
--json adds "runs": every contender's numbers per round.
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench._local_api import kept_api_stopped_after
from bench._table import print_table, with_spread
from bench.recovery import BenchError, _process, _wait

ROOT = Path(__file__).resolve().parents[1]
RUN_ID = "bench-scaling"
CONTENDERS = {"workers1": 1, "workers2": 2}
NUMERIC = ("tokens_per_s", "tokens", "train_s", "step_s", "e2e_tokens_per_s", "wall_s",
           "startup_s", "eval_s", "checkpoint_stall_s", "orchestration_s",
           "orchestration_per_group_s")


def _tokens_per_step(model: str, steps: int) -> int:
    from training.config import TrainConfig

    cfg = TrainConfig(model=model, steps=steps, torch_threads=1, device="cpu").resolved()
    return cfg.batch_size * cfg.block_size


def run_flow(args: argparse.Namespace, workdir: Path, workers: int) -> dict[str, Any]:
    """One `flows.train --workers W` run; its throughput numbers from the summary."""
    summary_path = workdir / "summary.json"
    cmd = [sys.executable, "-m", "flows.train", "--no-progress", "--model", args.model,
           "--steps", str(args.steps), "--group-steps", str(args.group_steps),
           "--workers", str(workers), "--spares", "0", "--threads", "1",
           "--store", str(workdir / "store"), "--run-id", RUN_ID, "--fresh",
           "--summary-json", str(summary_path), *(["--data", args.data] if args.data else [])]
    name = f"workers{workers}"
    with _process(cmd, workdir, name) as proc:
        _wait(proc, args.timeout, f"python -m flows.train --workers {workers}",
              workdir / f"{name}.out")
    summary = json.loads(summary_path.read_text())
    if summary.get("status") != "completed" or summary.get("final_step") != args.steps:
        raise BenchError(f"{name}: run ended {summary.get('status')} at step "
                         f"{summary.get('final_step')}: {summary.get('reason')}")
    parts = summary["wall_breakdown"]
    tokens = args.steps * _tokens_per_step(args.model, args.steps)
    train_s = float(summary["productive_s"])
    groups = math.ceil(args.steps / args.group_steps)
    return {
        "tokens_per_s": tokens / train_s,
        "tokens": tokens,
        "train_s": train_s,
        "step_s": train_s / args.steps,
        "e2e_tokens_per_s": tokens / (float(summary["wall_s"]) - float(parts["startup_s"])),
        "wall_s": float(summary["wall_s"]),
        "startup_s": float(parts["startup_s"]),
        "eval_s": float(parts["eval_s"]),
        "checkpoint_stall_s": float(parts["checkpoint_stall_s"]),
        "orchestration_s": float(parts["orchestration_s"]),
        "orchestration_per_group_s": float(parts["orchestration_s"]) / groups,
        "state_hash": summary.get("state_hash"),
        "status": summary["status"],
    }


# ---- the all-reduce, measured apart -------------------------------------------------------

def _allreduce_rank(rdv_json: str, rank: int, model: str, reps: int) -> None:
    """One rank of the side measurement: real gradients of the model, real gloo."""
    import torch

    from training.config import TrainConfig
    from training.data import load_corpus
    from training.distributed import RankGroup, Rendezvous
    from training.loop import Trainer

    torch.set_num_threads(1)
    group = RankGroup(Rendezvous.from_dict(json.loads(rdv_json)), rank)
    cfg = TrainConfig(model=model, steps=10, torch_threads=1, device="cpu").resolved()
    trainer = Trainer(cfg, load_corpus(None), device="cpu")  # alone: its step has no collective
    trainer.train_step()  # every parameter now has a gradient of the real shapes
    params = list(trainer.model.parameters())
    loss = torch.tensor(1.0)
    times = []
    for i in range(reps + 2):
        started = time.perf_counter()
        group.average_gradients(params, loss)
        if i >= 2:
            times.append(time.perf_counter() - started)
    group.close()
    if rank == 0:
        print(json.dumps({"allreduce_s": statistics.median(times)}))


def measure_allreduce(args: argparse.Namespace, workdir: Path) -> float:
    """Median seconds of one gradient all_reduce between two one-thread gloo ranks."""
    from datetime import timedelta

    from training.distributed import RendezvousServer

    server = RendezvousServer()
    try:
        rdv = json.dumps(server.rendezvous("bench-scaling", 2, timedelta(seconds=120)).to_dict())
        cmd = [sys.executable, "-m", "bench.scaling", "--allreduce-rank", rdv]
        outs = []
        with _process([*cmd, "1", args.model, str(args.allreduce_reps)], workdir, "allreduce-1"):
            with _process([*cmd, "0", args.model, str(args.allreduce_reps)], workdir,
                          "allreduce-0") as lead:
                _wait(lead, args.timeout, "all_reduce rank 0", workdir / "allreduce-0.out")
                outs = (workdir / "allreduce-0.out").read_text().splitlines()
    finally:
        server.close()
    line = next((x for x in reversed(outs) if x.startswith("{")), None)
    if line is None:
        raise BenchError("all_reduce measurement printed nothing")
    return float(json.loads(line)["allreduce_s"])


# ---- driver -------------------------------------------------------------------------------

def _row(method: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"method": method}
    for key in NUMERIC:
        with_spread(row, key, [r[key] for r in runs], 1 if "tokens" in key else 3)
    row["failed_runs"] = sum(str(r["status"]).startswith("failed") for r in runs)
    return row


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.scaling", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="model preset (default small)")
    p.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--group-steps", type=int, default=50,
                   help="optimizer steps per batch group (default 50)")
    p.add_argument("--rounds", type=int, default=3,
                   help="repeat both contenders, alternating the order (default 3)")
    p.add_argument("--allreduce-reps", type=int, default=20,
                   help="timed all_reduce calls of the side measurement (default 20)")
    p.add_argument("--data", help="corpus (default: the stdlib's source)")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds one run may take before it is stopped (default 900)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    if min(args.steps, args.group_steps, args.rounds, args.allreduce_reps) < 1:
        p.error("--steps, --group-steps, --rounds and --allreduce-reps must be >= 1")
    return args


def _overhead(by: dict[str, dict[str, Any]], allreduce_s: float | None) -> dict[str, Any]:
    s1, s2 = by["workers1"]["step_s"], by["workers2"]["step_s"]
    if s1 is None or s2 is None:
        return {}
    ideal = s1 / 2
    out = {"ideal_step_s": round(ideal, 4), "extra_step_s": round(s2 - ideal, 4),
           "allreduce_s": None if allreduce_s is None else round(allreduce_s, 4),
           "other_step_s": None if allreduce_s is None else round(s2 - ideal - allreduce_s, 4),
           "orchestration_per_group_s": by["workers2"]["orchestration_per_group_s"]}
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in CONTENDERS}
    allreduce_s: float | None = None
    with tempfile.TemporaryDirectory(prefix="rebound-bench-scaling-") as tmp:
        for round_no in range(args.rounds):
            order = list(CONTENDERS) if round_no % 2 == 0 else list(reversed(CONTENDERS))
            for name in order:
                workdir = Path(tmp) / f"{name}-{round_no}"
                workdir.mkdir()
                try:
                    results[name].append(run_flow(args, workdir, CONTENDERS[name]))
                except BenchError as e:
                    print(f"bench.scaling: round {round_no + 1} {name}: {e}", file=sys.stderr)
                    results[name].append({**dict.fromkeys(NUMERIC), "state_hash": None,
                                          "status": f"failed: {str(e).splitlines()[-1]}"})
                    continue
                if not args.json:
                    print(f"round {round_no + 1}/{args.rounds} {name}: "
                          f"{results[name][-1]['tokens_per_s']:.0f} tokens/s", file=sys.stderr)
        workdir = Path(tmp) / "allreduce"
        workdir.mkdir()
        try:
            allreduce_s = measure_allreduce(args, workdir)
        except BenchError as e:
            print(f"bench.scaling: all_reduce measurement: {e}", file=sys.stderr)
    rows = [_row(name, runs) for name, runs in results.items()]
    by = {r["method"]: r for r in rows}
    ratios = {}
    for key, ratio in (("tokens_per_s", "workers2_vs_1_throughput"),
                       ("e2e_tokens_per_s", "workers2_vs_1_e2e_throughput")):
        if by["workers1"][key] and by["workers2"][key]:
            ratios[ratio] = round(by["workers2"][key] / by["workers1"][key], 3)
    overhead = _overhead(by, allreduce_s)
    failed = sum(r["failed_runs"] for r in rows) + (allreduce_s is None)
    if args.json:
        print(json.dumps({"rows": rows, "ratios": ratios, "dp_overhead": overhead,
                          "runs": results}))
    else:
        print_table(f"bench.scaling: {args.model}, {args.steps} steps, groups of "
                    f"{args.group_steps}, 1 thread per worker, median (min-max) of "
                    f"{args.rounds} round(s)", rows, ratios)
        print("where the rest goes (per step, workers2): " +
              ", ".join(f"{k} {v}" for k, v in overhead.items()))
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--allreduce-rank":
        # A rank of the side measurement (started by measure_allreduce, not by hand).
        _allreduce_rank(sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]))
        sys.exit(0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with kept_api_stopped_after():
            status = main()
        sys.exit(status)
    except KeyboardInterrupt:
        print("bench.scaling: interrupted", file=sys.stderr)
        sys.exit(130)
