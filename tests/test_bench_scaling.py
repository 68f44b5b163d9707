"""`python -m bench.scaling`: one rank against two data-parallel ranks, timed the same way.

The tiny preset for a few steps, one round: it checks the mechanics (two real runs, the side
all_reduce between real gloo ranks, JSON shape) and that the numbers agree with each other, not
the numbers themselves (the real run is by hand).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_scaling_bench_json(prefect_api: str) -> None:
    # prefect_api: the session's Prefect server, so the runs do not start their own.
    steps, group_steps = 12, 6
    proc = subprocess.run(
        [sys.executable, "-m", "bench.scaling", "--model", "tiny", "--steps", str(steps),
         "--group-steps", str(group_steps), "--rounds", "1", "--allreduce-reps", "5", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=410)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    rows = {r["method"]: r for r in out["rows"]}
    runs = out["runs"]
    assert set(rows) == set(runs) == {"workers1", "workers2"}
    for method, row in rows.items():
        (run,) = runs[method]
        assert run["status"] == "completed" and row["failed_runs"] == 0, method
        for key in ("tokens_per_s", "train_s", "step_s", "wall_s", "orchestration_s"):
            assert row[f"{key}_min"] <= row[key] <= row[f"{key}_max"], (method, key)
        # The rate is the tokens over the training time, and the step time its share.
        assert run["tokens_per_s"] == pytest.approx(run["tokens"] / run["train_s"], rel=1e-6)
        assert run["step_s"] == pytest.approx(run["train_s"] / steps, rel=1e-6)
        # Training is a part of the wall time after start-up, so e2e is the slower rate.
        assert 0 < run["train_s"] < run["wall_s"] - run["startup_s"], method
        assert run["e2e_tokens_per_s"] < run["tokens_per_s"], method
    # The same global batch: both train the same tokens.
    assert rows["workers1"]["tokens"] == rows["workers2"]["tokens"] > 0
    ratio = out["ratios"]["workers2_vs_1_throughput"]
    assert ratio == pytest.approx(rows["workers2"]["tokens_per_s"] / rows["workers1"]["tokens_per_s"],
                                  rel=0.01)
    over = out["dp_overhead"]
    assert over["ideal_step_s"] == pytest.approx(rows["workers1"]["step_s"] / 2, abs=1e-3)
    assert over["extra_step_s"] == pytest.approx(rows["workers2"]["step_s"] - over["ideal_step_s"],
                                                 abs=1e-3)
    assert over["allreduce_s"] > 0
    assert over["other_step_s"] == pytest.approx(over["extra_step_s"] - over["allreduce_s"],
                                                 abs=1e-3)
