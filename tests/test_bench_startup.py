"""bench.startup times the command to the first step the same way for every contender.

Tiny preset, one round of torchrun and of Rebound on a warm machine: the mechanics and the
meaning of each number, not the start-up itself (the real run is by hand, `python -m
bench.startup`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_helpers import our_processes_since, pids_now

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_startup_bench_times_the_first_step_and_stops_what_it_started() -> None:
    before = pids_now()
    proc = subprocess.run(
        [sys.executable, "-m", "bench.startup", "--model", "tiny", "--steps", "3", "--threads",
         "1", "--rounds", "1", "--contenders", "torchrun,rebound_warm", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=390)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    rows = {r["method"]: r for r in out["rows"]}
    assert set(rows) == {"torchrun", "rebound_warm"}
    for name, row in rows.items():
        [run] = out["runs"][name]
        # Each number is one moment of the same run: ready, then the first step, then the exit.
        assert 0 < run["ready_s"] <= run["first_step_s"] < run["wall_s"], (name, run)
        assert row["first_step_s"] == pytest.approx(run["first_step_s"], abs=0.01)
    warm = out["runs"]["rebound_warm"][0]
    assert 0 < warm["started_s"] <= warm["ready_s"]
    assert out["ratios"]["rebound_warm_first_step_s"] == rows["rebound_warm"]["first_step_s"]
    assert out["ratios"]["rebound_warm_vs_torchrun_first_step"] == pytest.approx(
        rows["rebound_warm"]["first_step_s"] / rows["torchrun"]["first_step_s"], abs=0.01)
    # The kept API and cluster the bench started are gone with it (stopped by PID).
    assert our_processes_since(before) == []


def test_an_unknown_contender_is_one_line_of_usage() -> None:
    proc = subprocess.run([sys.executable, "-m", "bench.startup", "--contenders", "torchrun,x"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "--contenders: 'torchrun,x': a comma-separated list" in proc.stderr
