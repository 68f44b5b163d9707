"""bench.recovery: from a SIGKILLed training process to the next completed step, side by side.

The contenders train the same model preset on the same data for the same steps with the same
checkpoint interval N, and lose their training process once, right after step K (--kill-after)
has completed:
  rebound_hot_spare
            `python -m flows.train --workers 1 --spares 1 --chaos kill-worker@K+1` on a Dask
            LocalCluster of two worker processes: the Dask worker that is about to start step
            K+1 SIGKILLs itself (`fired_unix` in the store: the time just before the kill); the
            batch group runs again on the other, already warm worker from the newest verified
            checkpoint.
  rebound_no_spare
            the same with `--spares 0`: one worker process, so the group waits for the nanny to
            restart the killed worker (the bare mechanism, no spare paid for).
  torchrun  `torchrun --standalone --nproc-per-node=1 --max-restarts=3 bench/torchrun_train.py`:
            the same Trainer with torch.save checkpoints every N steps (tmp + fsync + rename) that
            resumes from its checkpoint on start. The benchmark tails the script's step log and
            SIGKILLs the training child by PID half a step-time after it logged step K; the
            elastic agent starts a new process.

Rows (one per contender; each number is the median over --rounds rounds, with its min and max
beside it in the table and as NAME_min / NAME_max in --json):
  recovery_s   kill -> the first optimizer step completed after it (Rebound: the first
               `first_step_unix` of an attempt that started after the kill minus the kill's
               `fired_unix`; torchrun: the first step logged by a new PID minus the kill time)
  detected_s   kill -> the replacement started (Rebound: the retried attempt's `started_unix`;
               torchrun: the new process's start, before `import torch`)
  ready_s      kill -> the replacement has its state restored and is about to train (Rebound:
               the retried attempt's `ready_unix`; torchrun: after its checkpoint is loaded);
               recovery_s - ready_s is the first step after the restore
  steps_lost   steps the killed process had completed that had to be trained again
               (last step completed before the kill - the step the replacement resumed from)
  step_s       time of one training step in steady state, measured the same way for all:
               the median over the run's last two checkpoint intervals of the interval's mean
               StepResult.seconds (data + forward + backward + optimizer; checkpoints
               excluded). Rebound: increase of productive_s in the metadata of its newest three
               checkpoints (kept with --keep 3) / steps; torchrun: the same sums over the step
               seconds in its log (the surviving execution of each step)
  wall_s       the whole contender run, process start to exit (start-up included)
  summary_recovered_s, summary_lost_steps
               Rebound only: the failure entry of its --summary-json, as a cross-check
With --workers 2 both contenders train data-parallel, two ranks of one torch thread each,
the same global batch split in two, and lose rank 1 once (SIGKILL) as it starts step K+1:
  rebound_hot_spare
            `python -m flows.train --workers 2 --spares 1 --chaos kill-worker@K+1/1`: the
            surviving rank keeps its state in memory; the group re-forms with the warm spare,
            which receives that state from its peer (no checkpoint read).
  torchrun  `torchrun --nproc-per-node=2 ... bench/torchrun_train.py` (gloo all_reduce every
            step, rank 0 checkpoints every N): the benchmark SIGKILLs rank 1 by PID (ranks.log)
            half a step after rank 0 logged step K; the elastic agent stops rank 0 and restarts
            both ranks from the checkpoint.
  (rebound_no_spare is not run with --workers 2.) The numbers are those above, rank 0's side;
  Rebound's steps_lost is 0 when the state came from the surviving peer (its attempt record's
  restored_from is peer or warm: the survivor stopped at step K, as the killed rank never
  contributed to step K+1's all_reduce), else K - the checkpoint step it resumed from.
Ratios (higher = Rebound recovers faster; target >= 2), each of medians:
  torchrun_vs_rebound_hot_spare_recovery_time = torchrun recovery_s / rebound_hot_spare recovery_s
  torchrun_vs_rebound_no_spare_recovery_time  = torchrun recovery_s / rebound_no_spare recovery_s
  torchrun_vs_rebound_recovery_time_dp2 = the same with --workers 2 (target >= 5)
  failed_runs  rounds of this contender that did not complete (their numbers are left out of
               the medians; the exit status is then 1, after the table)
--json adds "runs": every contender's numbers per round, state_hash and status included.

All contenders reach the same final weights when their resume is exact; the table says whether
the final state_hash values (DESIGN.md §2) agree. They run one after the other (never together:
on a 2-core machine they would slow each other down), in alternating order per round.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench._local_api import kept_api_stopped_after
from bench._table import print_table, with_spread

if TYPE_CHECKING:
    from storage.store import CheckpointStore

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_SCRIPT = ROOT / "bench" / "torchrun_train.py"
REBOUND_RUN_ID = "bench-recovery"
POLL_S = 0.005
"""How often the step log is read while waiting for the kill point: well under a step."""
STOP_GRACE_S = 5.0
"""SIGTERM -> SIGKILL grace when a contender has to be stopped (failure or timeout)."""


class BenchError(RuntimeError):
    """A contender did not do what the measurement needs (failed, hung, never recovered)."""


@contextmanager
def _process(cmd: list[str], log_dir: Path, name: str, env: dict[str, str] | None = None
             ) -> Iterator[subprocess.Popen[bytes]]:
    """Start cmd in its own session and always stop its whole process group afterwards.

    Its own session, so that the group id is its PID: stopping the group also stops what it
    spawned (Dask nanny and workers, torchrun's child, Prefect's server) and nothing else.
    Output goes to files (a pipe nobody reads would block a chatty child).
    """
    out = open(log_dir / f"{name}.out", "wb")  # noqa: SIM115 (closed in finally)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        yield proc
    finally:
        _stop_group(proc)
        out.close()


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group of proc, then SIGKILL what is left after a grace period.

    Also when proc itself already exited: a worker it spawned may have outlived it.
    """
    pgid = proc.pid
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(pgid):
                break
            time.sleep(0.05)
    if proc.poll() is None:
        proc.wait(timeout=STOP_GRACE_S)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _wait(proc: subprocess.Popen[bytes], timeout_s: float, name: str, log: Path) -> None:
    """Wait for a contender to exit 0; BenchError with the tail of its output otherwise."""
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise BenchError(f"{name} did not finish within {timeout_s:.0f} s; see {_tail(log)}") from e
    if rc != 0:
        raise BenchError(f"{name} exited {rc}:\n{_tail(log)}")


def _tail(log: Path, lines: int = 25) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no output)"


# ---- (a) Rebound --------------------------------------------------------------------------

def run_rebound(args: argparse.Namespace, workdir: Path, spares: int,
                extra_args: Sequence[str] = ()) -> dict[str, Any]:
    """One Rebound run with a worker (with --workers 2: rank 1's) killed as it starts step
    kill_after + 1; its numbers. extra_args go to flows.train as they are (bench.redundancy:
    `--standby cold`); its summary stays in workdir / "summary.json"."""
    from storage import open_store  # the store's reader only; nothing of Prefect/Dask here

    store_dir = workdir / "store"
    summary_path = workdir / "summary.json"
    kill_step = args.kill_after + 1
    chaos = f"kill-worker@{kill_step}" + ("/1" if args.workers > 1 else "")
    cmd = [sys.executable, "-m", "flows.train", "--no-progress", "--model", args.model,
           "--steps", str(args.steps), "--group-steps", str(args.group_steps),
           "--ckpt-every", str(args.ckpt_every), "--workers", str(args.workers),
           "--spares", str(spares), "--keep", str(STEP_S_INTERVALS + 1),
           "--threads", str(args.threads), "--chaos", chaos,
           "--store", str(store_dir), "--run-id", REBOUND_RUN_ID, "--fresh",
           "--summary-json", str(summary_path), *(["--data", args.data] if args.data else []),
           *extra_args]
    started = time.time()
    with _process(cmd, workdir, f"rebound-{spares}-spare") as proc:
        try:
            _wait(proc, args.timeout, f"rebound --spares {spares} (python -m flows.train)",
                  workdir / f"rebound-{spares}-spare.out")
        except BenchError as err:
            # The summary's reason says why in one line; the output's tail is mostly its table.
            reason = json.loads(summary_path.read_text()).get("reason") if summary_path.exists() else None
            raise BenchError(f"{err}\nreason: {reason}") from None
    wall_s = time.time() - started

    summary = json.loads(summary_path.read_text())
    store = open_store(str(store_dir))
    fired = dict(store.list_json(REBOUND_RUN_ID, "chaos"))
    if args.workers > 1:
        fired = dict(store.list_json(REBOUND_RUN_ID, "chaos-ranks"))
    # A rank's record is named kill-worker@STEP-REPLICA.RANK (tasks/chaos.py).
    event = next((doc for name, doc in fired.items()
                  if name.split("/")[-1].split("-0.")[0] == f"kill-worker@{kill_step}"), None)
    if event is None:
        raise BenchError(f"rebound: chaos kill-worker@{kill_step} never fired (records: {list(fired)})")
    killed_at = float(event["fired_unix"])
    # The recovery is the first attempt that started after the kill and completed a step.
    attempts = sorted((doc for _, doc in store.list_json(REBOUND_RUN_ID, "attempts")
                       if doc["started_unix"] > killed_at and doc.get("first_step_unix")),
                      key=lambda d: d["started_unix"])
    if not attempts:
        raise BenchError("rebound: no attempt after the kill completed a step")
    retry = attempts[0]
    if retry.get("restored_from") in ("peer", "warm"):
        # The survivor's memory: it completed kill_after and could not apply kill_after + 1.
        resumed_from = args.kill_after
    else:
        resumed_from = int(retry.get("resumed_from_step") or 0)
    failure = next((f for f in summary.get("failures", [])
                    if f["kind"] in ("kill-worker", "worker-lost") and f["step"] == kill_step), {})
    return {
        "recovery_s": float(retry["first_step_unix"]) - killed_at,
        "detected_s": float(retry["started_unix"]) - killed_at,
        "ready_s": float(retry["ready_unix"]) - killed_at,
        # The killed worker had completed kill_after (it died starting the next step).
        "steps_lost": args.kill_after - resumed_from,
        "step_s": _rebound_step_s(store),
        "wall_s": wall_s,
        "final_loss": float(summary["train_loss"]),
        "summary_recovered_s": failure.get("recovered_after_s"),
        "summary_lost_steps": failure.get("lost_steps"),
        "state_hash": summary.get("state_hash"),
        "status": summary.get("status"),
    }


def _rebound_step_s(store: CheckpointStore) -> float:
    """Mean training-step time over the last checkpoint intervals (see interval_step_s).

    Every checkpoint's metadata carries the run's cumulative productive_s: the sum of the
    StepResult.seconds of the steps that survive into it.
    """
    steps = sorted(store.steps(REBOUND_RUN_ID))
    productive = {s: store.read_metadata(REBOUND_RUN_ID, s).get("productive_s") for s in steps}
    return interval_step_s({s: float(v) for s, v in productive.items() if v is not None})


STEP_S_INTERVALS = 2
"""step_s is the median over this many of the newest checkpoint intervals."""


def interval_step_s(cumulative_s: dict[int, float]) -> float:
    """Median over the newest STEP_S_INTERVALS checkpoint intervals of the mean step time.

    cumulative_s maps a checkpoint's step to the training seconds of all steps up to it; an
    interval's mean step time is the increase over the interval divided by its steps.
    """
    steps = sorted(cumulative_s)[-(STEP_S_INTERVALS + 1):]
    per_step = [(cumulative_s[b] - cumulative_s[a]) / (b - a) for a, b in zip(steps, steps[1:], strict=False)]
    if not per_step:
        raise BenchError(f"too few checkpoints ({steps}) to time a step")
    return statistics.median(per_step)


# ---- (b) torchrun -------------------------------------------------------------------------

@dataclass(frozen=True)
class _Step:
    step: int
    unix: float
    pid: int
    seconds: float


def _read_steps(path: Path) -> list[_Step]:
    """The complete lines of the script's step log (a line being written is left for later)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    steps = []
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        step, unix, pid, seconds = line.split()
        steps.append(_Step(int(step), float(unix), int(pid), float(seconds)))
    return steps


def _parent_pid(pid: int) -> int | None:
    """PPid of a live process (Linux /proc); None when it is gone or /proc is unavailable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("PPid:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def _median_gap(steps: list[_Step]) -> float:
    """Median time between consecutive steps of one process (checkpoint steps included)."""
    gaps = [b.unix - a.unix for a, b in zip(steps, steps[1:], strict=False)
            if b.pid == a.pid and b.step == a.step + 1]
    if not gaps:
        raise BenchError("torchrun: too few steps logged to time a step")
    return statistics.median(gaps)


def _torchrun_step_s(steps: list[_Step], args: argparse.Namespace) -> float:
    """step_s as Rebound's: cumulative seconds of the surviving steps at each checkpoint step."""
    surviving = {s.step: s.seconds for s in steps}  # the log is in time order: last run wins
    ckpts = sorted({*range(args.ckpt_every, args.steps + 1, args.ckpt_every), args.steps})
    return interval_step_s({c: sum(surviving[i] for i in range(1, c + 1)) for c in ckpts})


def _torchrun_cmd() -> list[str]:
    # The venv's torchrun (same interpreter as us); the module form is the same entry point.
    exe = Path(sys.executable).with_name("torchrun")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]


def _kill_training_child(proc: subprocess.Popen[bytes], steps_log: Path, kill_after: int,
                         timeout_s: float, victim_rank: int = 0) -> tuple[float, int, int]:
    """Wait for step kill_after in the log, then SIGKILL rank victim_rank by PID half a step
    later (rank 0 logs the steps; another rank's PID is the newest in ranks.log).

    Returns (kill time, killed PID, PID of the process that logged the steps).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        steps = _read_steps(steps_log)
        hit = next((s for s in steps if s.step == kill_after), None)
        if hit is not None:
            break
        if proc.poll() is not None:
            raise BenchError(f"torchrun exited ({proc.returncode}) before step {kill_after}")
        if time.monotonic() > deadline:
            raise BenchError(f"torchrun: step {kill_after} not reached within {timeout_s:.0f} s")
        time.sleep(POLL_S)
    own = [s for s in steps if s.pid == hit.pid and s.step <= kill_after]
    half_step = _median_gap(own) / 2
    time.sleep(max(0.0, hit.unix + half_step - time.time()))
    # By PID, never by name; and only if that PID is still torchrun's own child (not reused).
    victim = hit.pid if victim_rank == 0 else _rank_pid(steps_log.with_name("ranks.log"), victim_rank)
    if _parent_pid(victim) != proc.pid:
        raise BenchError(f"torchrun: training process {victim} is gone or not torchrun's child")
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)
    return killed_at, victim, hit.pid


def _rank_pid(ranks_log: Path, rank: int) -> int:
    """The newest PID that rank `rank` logged at its start (ranks.log: "rank pid" lines)."""
    pids = [int(pid) for r, pid in (line.split() for line in ranks_log.read_text().splitlines())
            if int(r) == rank]
    if not pids:
        raise BenchError(f"torchrun: rank {rank} never started")
    return pids[-1]


def run_torchrun(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One torchrun run whose training child (with --workers 2: rank 1) is SIGKILLed after
    step kill_after; its numbers."""
    out = workdir / "out"
    out.mkdir()
    steps_log = out / "steps.log"
    cmd = [*_torchrun_cmd(), "--standalone", f"--nproc-per-node={args.workers}", "--max-restarts=3",
           # Loopback only: the rendezvous store must not listen on, or resolve, other interfaces.
           "--local-addr", "127.0.0.1",
           str(TORCHRUN_SCRIPT), "--model", args.model, "--steps", str(args.steps),
           "--ckpt-every", str(args.ckpt_every), "--threads", str(args.threads),
           "--out", str(out), *(["--data", args.data] if args.data else [])]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1")
    started = time.time()
    with _process(cmd, workdir, "torchrun", env=env) as proc:
        killed_at, killed_pid, logger_pid = _kill_training_child(
            proc, steps_log, args.kill_after, args.timeout, victim_rank=args.workers - 1)
        _wait(proc, args.timeout, "torchrun", workdir / "torchrun.out")
    wall_s = time.time() - started

    steps = _read_steps(steps_log)
    # Rank 0 logs the steps; a step of the killed generation never counts as the recovery.
    after = [s for s in steps if s.pid not in (killed_pid, logger_pid) and s.unix > killed_at]
    if not after:
        raise BenchError("torchrun: no step completed after the kill")
    first = after[0]
    resumed_from = first.step - 1
    last_done = max(s.step for s in steps if s.pid == logger_pid)
    starts = {int(pid): (float(start), float(ready))
              for pid, start, ready, _ in (line.split() for line in
                                           (out / "starts.log").read_text().splitlines())}
    restart, ready = starts.get(first.pid, (float("nan"), float("nan")))
    final = json.loads((out / "final.json").read_text())
    return {
        "recovery_s": first.unix - killed_at,
        "detected_s": restart - killed_at,
        "ready_s": ready - killed_at,
        "steps_lost": last_done - resumed_from,
        "step_s": _torchrun_step_s(steps, args),
        "wall_s": wall_s,
        "final_loss": float(final["train_loss"]),
        "summary_recovered_s": None,
        "summary_lost_steps": None,
        "state_hash": final["state_hash"],
        "status": "completed" if final["final_step"] == args.steps else "incomplete",
    }


# ---- driver -------------------------------------------------------------------------------

CONTENDERS: dict[str, Callable[[argparse.Namespace, Path], dict[str, Any]]] = {
    "rebound_hot_spare": functools.partial(run_rebound, spares=1),
    "rebound_no_spare": functools.partial(run_rebound, spares=0),
    "torchrun": run_torchrun,
}
NUMERIC = ("recovery_s", "detected_s", "ready_s", "steps_lost", "step_s", "wall_s", "final_loss",
           "summary_recovered_s", "summary_lost_steps")


def _row(method: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    row: dict[str, Any] = {"method": method}
    for key in NUMERIC:
        with_spread(row, key, [r[key] for r in runs], 4 if key == "final_loss" else 3)
    row["failed_runs"] = sum(str(r["status"]).startswith("failed") for r in runs)
    return row


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.recovery", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="model preset, both contenders (default small)")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    p.add_argument("--ckpt-every", type=int, default=10,
                   help="checkpoint interval N in steps, both contenders (default 10)")
    p.add_argument("--group-steps", type=int, default=20,
                   help="Rebound optimizer steps per batch-group task (default 20)")
    p.add_argument("--kill-after", type=int, default=35,
                   help="the kill comes after this step completed: Rebound kill-worker@K+1, "
                        "torchrun half a step after step K (default 35)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per process, both contenders (default 2; 1 per rank "
                        "with --workers 2)")
    p.add_argument("--workers", type=int, default=1, choices=(1, 2),
                   help="1 (default): one training process; 2: two data-parallel ranks, rank 1 "
                        "killed; contenders rebound_hot_spare and torchrun")
    p.add_argument("--rounds", type=int, default=3,
                   help="repeat every contender, alternating the order; the table shows "
                        "medians and their range (default 3)")
    p.add_argument("--data", help="corpus, both contenders (default: the stdlib's source)")
    p.add_argument("--timeout", type=float, default=900.0,
                   help="seconds one contender run may take before it is stopped (default 900)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    if args.threads is None:
        args.threads = 2 if args.workers == 1 else 1
    if min(args.steps, args.ckpt_every, args.group_steps, args.threads, args.rounds) < 1:
        p.error("--steps, --ckpt-every, --group-steps, --threads and --rounds must be >= 1")
    if not 1 <= args.kill_after < args.steps:
        p.error("--kill-after must be in [1, steps): a step must remain after the kill")
    if args.kill_after < 2:
        p.error("--kill-after must be >= 2: timing the half step needs two logged steps")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    contenders = CONTENDERS if args.workers == 1 else \
        {k: v for k, v in CONTENDERS.items() if k != "rebound_no_spare"}
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in contenders}
    with tempfile.TemporaryDirectory(prefix="rebound-bench-recovery-") as tmp:
        for round_no in range(args.rounds):
            # Alternate the order so neither always runs on a machine the other just warmed.
            order = list(contenders) if round_no % 2 == 0 else list(reversed(contenders))
            for name in order:
                workdir = Path(tmp) / f"{name}-{round_no}"
                workdir.mkdir()
                try:
                    results[name].append(contenders[name](args, workdir))
                except BenchError as e:
                    # Kept as a failed round: the other contenders' numbers still count, and the
                    # table says how many rounds of this one failed.
                    print(f"bench.recovery: round {round_no + 1} {name}: {e}", file=sys.stderr)
                    results[name].append({**dict.fromkeys(NUMERIC), "state_hash": None,
                                          "status": f"failed: {str(e).splitlines()[-1]}"})
                    continue
                if not args.json:
                    r = results[name][-1]
                    print(f"round {round_no + 1}/{args.rounds} {name}: recovery "
                          f"{r['recovery_s']:.2f} s, {r['steps_lost']} steps lost",
                          file=sys.stderr)
    rows = [_row(name, runs) for name, runs in results.items()]
    by = {r["method"]: r for r in rows}
    # A ratio needs both medians: one is left out when every round of its contender failed.
    ratios = {f"torchrun_vs_{name}_recovery_time":
              round(by["torchrun"]["recovery_s"] / by[name]["recovery_s"], 3)
              for name in ("rebound_hot_spare", "rebound_no_spare")
              if name in by and by["torchrun"]["recovery_s"] and by[name]["recovery_s"]}
    if args.workers > 1:
        hot = ratios.pop("torchrun_vs_rebound_hot_spare_recovery_time", None)
        ratios = {} if hot is None else {"torchrun_vs_rebound_recovery_time_dp2": hot}
    failed = sum(r["failed_runs"] for r in rows)
    if args.json:
        print(json.dumps({"rows": rows, "ratios": ratios, "runs": results}))
    else:
        _print_table(args, rows, ratios, results)
    return 1 if failed else 0


def _print_table(args: argparse.Namespace, rows: list[dict[str, Any]], ratios: dict[str, float],
                 results: dict[str, list[dict[str, Any]]]) -> None:
    print_table(f"bench.recovery: {args.model}, {args.steps} steps, ckpt every "
                f"{args.ckpt_every}, group {args.group_steps}, kill after step {args.kill_after}, "
                f"{args.workers} process(es) x {args.threads} thread(s), median (min-max) of {args.rounds} round(s)", rows, ratios)
    hashes = {r["state_hash"] for runs in results.values() for r in runs if r["state_hash"]}
    for name, runs in results.items():
        for i, r in enumerate(runs):
            if str(r["status"]).startswith("failed"):
                print(f"{name} round {i + 1} {r['status']}")
    print("final state_hash: " + ("identical in every run" if len(hashes) == 1
                                  else f"DIFFERS between runs: {sorted(map(str, hashes))}"))


if __name__ == "__main__":
    # SIGTERM unwinds like an exception, so the finally blocks stop the contenders' processes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with kept_api_stopped_after():
            status = main()
        sys.exit(status)
    except KeyboardInterrupt:
        # Every contender's process group was already stopped on the way out (finally blocks).
        print("bench.recovery: interrupted", file=sys.stderr)
        sys.exit(130)
