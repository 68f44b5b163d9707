"""`python -m bench.recovery`: every contender loses its process, recovers, and is timed honestly.

A few steps of the tiny preset, so it checks the mechanics (kill by chaos / by PID, timing from
the store and the step log, JSON shape) and that each number is physically what its name says,
not the numbers themselves (the real run is by hand).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from bench.recovery import _Step, _torchrun_step_s, interval_step_s

ROOT = Path(__file__).resolve().parents[1]
NUMBERS = ("recovery_s", "detected_s", "ready_s", "steps_lost", "step_s", "wall_s")


def test_step_s_is_the_same_measure_for_every_contender() -> None:
    # 6 steps of 0.1 s each; checkpoints every 2 steps make every second gap in the log longer
    # (0.5 s): step_s is the steps' own time, as Rebound's productive_s, not the log's gaps.
    unix, steps = 0.0, []
    for step in range(1, 7):
        unix += 0.1 + (0.4 if step % 2 == 1 and step > 1 else 0.0)
        steps.append(_Step(step, unix, 100, 0.1))
    # Step 5 was first run by a process that then died: its slow first try is not the survivor.
    steps.insert(4, _Step(5, 0.0, 99, 9.0))
    args = argparse.Namespace(ckpt_every=2, steps=6)
    assert _torchrun_step_s(steps, args) == pytest.approx(0.1)
    # Rebound's side: cumulative productive_s at checkpoints 2, 4, 6 (newest two intervals).
    assert interval_step_s({0: 0.0, 2: 0.2, 4: 0.4, 6: 0.7}) == pytest.approx(0.125)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_recovery_bench_json(prefect_api: str) -> None:
    # prefect_api: the session's Prefect server, so the Rebound runs do not start their own.
    steps, ckpt_every, kill_after = 12, 3, 4
    proc = subprocess.run(
        [sys.executable, "-m", "bench.recovery", "--model", "tiny", "--steps", str(steps),
         "--ckpt-every", str(ckpt_every), "--group-steps", "6", "--kill-after", str(kill_after),
         "--threads", "1", "--rounds", "1", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=410)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    rows = {r["method"]: r for r in out["rows"]}
    runs = out["runs"]
    assert set(rows) == set(runs) == {"rebound_hot_spare", "rebound_no_spare", "torchrun"}
    for method, row in rows.items():
        (run,) = runs[method]
        for key in NUMBERS:
            # One round: the median is that round's number, and the spread brackets it.
            assert row[key] == pytest.approx(run[key], abs=1e-3), (method, key)
            assert row[f"{key}_min"] <= row[key] <= row[f"{key}_max"], (method, key)
        # The replacement starts after the kill, is restored after it starts, trains after that.
        assert 0 < row["detected_s"] <= row["ready_s"] <= row["recovery_s"], method
        # At most one checkpoint interval is redone, and the run finished all its steps.
        assert 0 <= row["steps_lost"] <= ckpt_every, method
        assert 0 < row["step_s"] and row["step_s"] * steps < row["wall_s"], method
        assert run["status"] == "completed" and row["failed_runs"] == 0, method
    for method in ("rebound_hot_spare", "rebound_no_spare"):
        # Killed starting step 5, the newest checkpoint is 3: step 4 is redone.
        assert rows[method]["steps_lost"] == kill_after - (kill_after // ckpt_every) * ckpt_every
        assert rows[method]["summary_lost_steps"] == rows[method]["steps_lost"]
    # Every contender ends with the same weights (exact resume, DESIGN.md section 5).
    hashes = {r["state_hash"] for method_runs in runs.values() for r in method_runs}
    assert len(hashes) == 1 and None not in hashes, hashes
    for name in ("rebound_hot_spare", "rebound_no_spare"):
        ratio = out["ratios"][f"torchrun_vs_{name}_recovery_time"]
        medians = [statistics.median(r["recovery_s"] for r in runs[m]) for m in ("torchrun", name)]
        assert ratio == pytest.approx(medians[0] / medians[1], rel=0.01), name


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_recovery_bench_json_two_ranks(prefect_api: str) -> None:
    # Rank 1 of two data-parallel ranks dies starting step 5; checkpoints every 3 steps.
    steps, ckpt_every, kill_after = 12, 3, 4
    proc = subprocess.run(
        [sys.executable, "-m", "bench.recovery", "--workers", "2", "--model", "tiny",
         "--steps", str(steps), "--ckpt-every", str(ckpt_every), "--group-steps", "6",
         "--kill-after", str(kill_after), "--rounds", "1", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=410)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    rows = {r["method"]: r for r in out["rows"]}
    runs = out["runs"]
    assert set(rows) == set(runs) == {"rebound_hot_spare", "torchrun"}
    for method, row in rows.items():
        (run,) = runs[method]
        for key in NUMBERS:
            assert row[key] == pytest.approx(run[key], abs=1e-3), (method, key)
            assert row[f"{key}_min"] <= row[key] <= row[f"{key}_max"], (method, key)
        assert 0 < row["detected_s"] <= row["ready_s"] <= row["recovery_s"], method
        assert 0 <= row["steps_lost"] <= ckpt_every, method
        assert run["status"] == "completed" and row["failed_runs"] == 0, method
    # torchrun restarts both ranks from its last checkpoint: the steps since are redone (at
    # least step 4; a tiny step is ~10 ms, so on a busy machine the kill, half a step after
    # step 4 shows in the log, can land a step later). Rebound's survivor kept its last step in
    # memory and handed it to the spare: nothing completed is redone.
    assert 1 <= rows["torchrun"]["steps_lost"] <= ckpt_every
    assert rows["rebound_hot_spare"]["steps_lost"] == 0
    # The same averaging on both sides: the same final weights.
    hashes = {r["state_hash"] for method_runs in runs.values() for r in method_runs}
    assert len(hashes) == 1 and None not in hashes, hashes
    medians = [statistics.median(r["recovery_s"] for r in runs[m])
               for m in ("torchrun", "rebound_hot_spare")]
    assert out["ratios"] == {"torchrun_vs_rebound_recovery_time_dp2":
                             pytest.approx(medians[0] / medians[1], rel=0.01)}
