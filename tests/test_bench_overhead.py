"""bench.overhead times the same window for both contenders and reports its spread honestly.

Tiny preset, a few steps, 2 rounds: it checks the mechanics and that every number is what its
name says, not the overhead itself (the real run is by hand, `python -m bench.overhead`).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_plain_loop_warm_up_pays_adamws_first_use() -> None:
    # What the warm-up is for: AdamW's first step loads torch._dynamo (~1.5 s), which Rebound's
    # workers pay while booting; the plain loop must pay it before its window opens too.
    code = ("import sys, bench.plain_loop as p; assert 'torch._dynamo' not in sys.modules; "
            "p.warm_adamw(); print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "True"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_overhead_bench_windows_and_spread(prefect_api: str) -> None:
    # prefect_api: the session's Prefect server, so each Rebound run does not start its own.
    steps = 6
    proc = subprocess.run(
        [sys.executable, "-m", "bench.overhead", "--model", "tiny", "--steps", str(steps),
         "--ckpt-every", "3", "--group-steps", "3", "--threads", "1", "--device", "cpu",
         "--rounds", "2", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=290)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    rows = {r["method"]: r for r in out["rows"]}
    assert set(rows) == {"plain_loop", "rebound"}
    runs = out["runs"]
    for name, row in rows.items():
        assert len(runs[name]) == 2, name
        walls = [r["train_wall_s"] for r in runs[name]]
        assert row["train_wall_s"] == pytest.approx(sum(walls) / 2, abs=0.01), name
        assert row["train_wall_s_min"] <= row["train_wall_s"] <= row["train_wall_s_max"], name
        assert row["train_wall_s_min"] == pytest.approx(min(walls), abs=0.01), name
        assert row["tokens_per_s"] == pytest.approx(
            statistics.median([out["tokens"] / w for w in walls]), rel=0.01), name
        for r in runs[name]:
            assert r["window_end_unix"] - r["window_start_unix"] == pytest.approx(r["train_wall_s"])
            assert 0 < r["ckpt_s"] < r["train_wall_s"], name
    for r in runs["plain_loop"]:
        assert r["device"] == "cpu"
    for r in runs["rebound"]:
        # The window closes after the final evaluation, which comes after the final commit: not
        # at the marker's mtime (written before its fsync and the rename).
        assert r["window_end_unix"] > r["final_commit_unix"] > r["window_start_unix"]
        assert r["final_step"] == steps
    # The machine was probed around each of the four runs: two probes each, per round.
    assert [len(r) for r in out["machine"]["rounds"]] == [4, 4]
    assert all(r["machine_gflops"] > 0 for rs in runs.values() for r in rs)
    ratio = out["ratios"]["rebound_vs_plain_loop_wall"]
    assert ratio == pytest.approx(rows["rebound"]["train_wall_s"] / rows["plain_loop"]["train_wall_s"],
                                  rel=0.01)

