"""`python -m bench.goodput`: both contenders lose training processes at the same wall-clock
intervals, finish, and are scored by the same definition of productive time.

The tiny preset for a few hundred steps with a kill every 6 s, so it checks the
mechanics (kills by PID from outside, the numbers' meaning, the JSON shape), not the numbers
(the real run is by hand, see the README)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.goodput import kill_offsets, young_daly_steps
from tests.cli_helpers import our_processes_since, pids_now

ROOT = Path(__file__).resolve().parents[1]


def test_young_daly_interval_in_steps() -> None:
    # C = 0.5 s, MTBF = 100 s: sqrt(2 * 0.5 * 100) = 10 s of training = 20 steps of 0.5 s.
    assert young_daly_steps(0.5, 100.0, 0.5, 1000) == 20
    assert young_daly_steps(0.5, 100.0, 0.5, 7) == 7  # never past the run
    assert young_daly_steps(1e-6, 1.0, 10.0, 100) == 1  # never below one step


def test_kill_moments_one_per_window_the_same_for_both_contenders() -> None:
    fixed = kill_offsets(60.0, "fixed", 0)
    assert [fixed(n) for n in (1, 2, 3)] == [60.0, 120.0, 180.0]
    drawn = kill_offsets(60.0, "random", 7)
    moments = [drawn(n) for n in range(1, 41)]
    # Exactly one kill in each window, never at one fixed phase of it.
    assert all((n - 1) * 60.0 <= t < n * 60.0 for n, t in enumerate(moments, 1))
    phases = [t % 60.0 for t in moments]
    assert max(phases) - min(phases) > 30.0
    # A function of the seed and n alone: the other contender, asking later, meets the same moments.
    assert [kill_offsets(60.0, "random", 7)(n) for n in range(1, 41)] == moments
    assert [kill_offsets(60.0, "random", 8)(n) for n in range(1, 41)] != moments


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_goodput_bench_json(prefect_api: str) -> None:
    # prefect_api: the session's Prefect server, so the Rebound run does not start its own.
    # Long enough that even a quick torchrun run (~0.02 s a step) outlives two kill intervals.
    steps, kill_every = 600, 6.0
    proc = subprocess.run(
        [sys.executable, "-m", "bench.goodput", "--model", "tiny", "--steps", str(steps),
         "--kill-every", str(kill_every), "--group-steps", "40", "--threads", "1", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=590)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    rows = {r["method"]: r for r in out["rows"]}
    runs = out["runs"]
    assert set(rows) == set(runs) == {"rebound", "torchrun"}
    assert out["probe"]["torchrun_ckpt_every"] == runs["torchrun"][0]["ckpt_every"] >= 1
    for method, row in rows.items():
        (run,) = runs[method]
        assert run["status"] == "completed" and row["failed_runs"] == 0, method
        # Killed once in each window of its own wall time that began (a kill waits while
        # nothing trains, so a late one may fall into the next window).
        assert 1 <= run["failures"] <= run["wall_s"] // kill_every + 1, method
        assert 0 < run["productive_s"] < run["wall_s"], method
        assert run["ettr"] == pytest.approx(run["productive_s"] / run["wall_s"]), method
        assert run["steps_lost"] >= 0, method
        # The same evaluations (every epoch's end and the last step) cost both contenders.
        assert 0 < run["eval_s"] < run["wall_s"] - run["productive_s"], method
    # A kill that hit a training task is in Rebound's summary; one that hit a worker between
    # tasks (the tiny preset spends most of its time in evaluation and orchestration) may not be.
    assert runs["rebound"][0]["summary_failures"] <= runs["rebound"][0]["failures"]
    assert len(runs["rebound"][0]["kills_s"]) == runs["rebound"][0]["failures"]
    assert out["ratios"]["rebound_vs_torchrun_ettr"] == pytest.approx(
        rows["rebound"]["ettr"] / rows["torchrun"]["ettr"], rel=1e-3)
    assert out["ratios"]["torchrun_vs_rebound_wall"] == pytest.approx(
        rows["torchrun"]["wall_s"] / rows["rebound"]["wall_s"], rel=1e-3)
    # Both resumed exactly: the same weights after the same steps.
    assert out["same_state_hash"], [r["state_hash"] for rs in runs.values() for r in rs]
    # The machine was probed before and after each contender's run.
    assert all(r["machine_gflops"] > 0 for rs in runs.values() for r in rs)
    assert len(out["machine"]["rounds"]) == 1 and len(out["machine"]["rounds"][0]) == 4
    assert len(out["machine"]["round_drift"]) == 1 and out["machine"]["round_drift"][0] >= 0


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_goodput_bench_kills_the_kept_clusters_workers(prefect_api: str) -> None:
    # --rebound-cluster kept: Rebound trains on the Dask cluster kept between runs, whose
    # workers are outside the run's process group; they are found, killed and replaced.
    steps, kill_every = 400, 6.0
    before = pids_now()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.goodput", "--model", "tiny", "--steps", str(steps),
         "--kill-every", str(kill_every), "--group-steps", "40", "--threads", "1",
         "--rebound-cluster", "kept", "--contenders", "rebound", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=390)
    # Whatever it started, the kept cluster and its priming run included, is gone with it.
    assert our_processes_since(before) == []
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    (run,) = out["runs"]["rebound"]
    assert set(out["runs"]) == {"rebound"} and out["ratios"] == {} and out["probe"] is None
    assert run["status"] == "completed"
    assert 1 <= run["failures"] == len(run["kills_s"]) <= run["wall_s"] // kill_every + 1
    assert run["summary_failures"] <= run["failures"]
    assert 0 < run["productive_s"] < run["wall_s"]
