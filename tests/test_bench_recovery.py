"""Smoke test of `python -m bench.recovery`: both contenders lose their process and recover.

A few steps of the tiny preset, so it checks the mechanics (kill by chaos / by PID, timing from
the store and the step log, JSON shape), not the numbers.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_recovery_bench_json(prefect_api: str) -> None:
    # prefect_api: the session's Prefect server, so the Rebound run does not start its own.
    steps, ckpt_every, kill_after = 12, 3, 4
    proc = subprocess.run(
        [sys.executable, "-m", "bench.recovery", "--model", "tiny", "--steps", str(steps),
         "--ckpt-every", str(ckpt_every), "--group-steps", "6", "--kill-after", str(kill_after),
         "--threads", "1", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert set(out) == {"rows", "ratios"}
    rows = {r["method"]: r for r in out["rows"]}
    assert set(rows) == {"rebound", "torchrun"}
    for method, row in rows.items():
        # Recovered: a step completed after the kill, and at most one interval was redone.
        assert row["recovery_s"] > 0, method
        assert 0 <= row["steps_lost"] <= ckpt_every, method
        assert row["step_s"] > 0, method
    # The last checkpoint before step kill_after + 1 is at 3: the killed step 4 is redone.
    assert rows["rebound"]["steps_lost"] == kill_after - (kill_after // ckpt_every) * ckpt_every
    assert rows["rebound"]["summary_lost_steps"] == rows["rebound"]["steps_lost"]
    ratio = out["ratios"]["torchrun_vs_rebound_recovery_time"]
    assert ratio == pytest.approx(rows["torchrun"]["recovery_s"] / rows["rebound"]["recovery_s"],
                                  rel=0.01)
