"""`python -m bench.redundancy`: every contender runs, and its numbers come back in shape.

The tiny preset for a few steps, one round: the mechanics (a rank killed under each standby,
replicas and votes run for real, JSON shape), not the numbers (the real run is by hand).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_helpers import kill_group

ROOT = Path(__file__).resolve().parents[1]
CONTENDERS = {"hot_spare", "cold_spare", "no_spare",
              "replicas1", "replicas2", "vote_every_step", "vote_default"}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_redundancy_bench_json(prefect_api: str) -> None:
    # prefect_api: the session's Prefect server, so neither the bench nor its runs start one.
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.redundancy", "--json", "--model", "tiny", "--rounds", "1",
         "--steps", "8", "--ckpt-every", "2", "--group-steps", "4", "--kill-after", "5"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=780)
    finally:
        if proc.poll() is None:
            # Each run is in a session of its own: SIGTERM lets the bench stop them by their
            # process groups; then the bench's own group goes, whatever is left of it.
            proc.terminate()
            try:
                proc.communicate(timeout=60)
            finally:
                kill_group(proc)
    assert proc.returncode == 0, stderr[-3000:]
    out = json.loads(stdout)
    assert {r["method"] for r in out["rows"]} == set(out["runs"]) == CONTENDERS
    assert all(r["failed_runs"] == 0 for r in out["rows"]), out["rows"]
    assert set(out["ratios"]) >= {"cold_vs_hot_recovery_time", "no_spare_vs_hot_recovery_time",
                                  "replicas2_vs_1_throughput", "vote_cost_fraction",
                                  "vote_cost_fraction_default_cadence"}
    for name, value in out["ratios"].items():
        assert isinstance(value, float) and math.isfinite(value) and value > 0, (name, value)
    rows = {r["method"]: r for r in out["rows"]}
    # Every step of the voting run votes; the default cadence votes at checkpoints only.
    assert rows["vote_every_step"]["votes"] == 8
    assert 0 < rows["vote_default"]["votes"] < 8
    assert rows["replicas1"]["votes"] is None
