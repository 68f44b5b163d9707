"""The machine-speed probe the benches take around every contender run (bench/_machine.py)."""

from __future__ import annotations

import pytest

from bench._machine import DRIFT_WARN, MachineSpeed, machine_gflops, report_lines


def test_the_probe_measures_real_work() -> None:
    assert machine_gflops(0.2) > 0.1


def test_each_round_says_how_far_the_machine_moved() -> None:
    # Probe values as a slowing machine would give them: round 1 steady, round 2 20% apart.
    values = iter([40.0, 40.0, 40.0, 39.0, 40.0, 36.0, 34.0, 33.0])
    speed = MachineSpeed(probe=lambda: next(values))
    runs = [speed.around(r, lambda: {"wall_s": 1.0}) for r in (0, 0, 1, 1)]
    assert [run["machine_gflops"] for run in runs] == [40.0, 39.5, 38.0, 33.5]
    assert speed.round_drift() == [pytest.approx(40 / 39 - 1, abs=1e-4),
                                   pytest.approx(40 / 33 - 1, abs=1e-4)]
    report = speed.report()
    assert report["rounds"] == [[40.0, 40.0, 40.0, 39.0], [40.0, 36.0, 34.0, 33.0]]
    assert report["drift_warn"] == DRIFT_WARN
    lines = report_lines(report)
    # Only the round that moved by more than the limit is flagged.
    assert len(lines) == 2 and lines[1].startswith("round 2: the machine's speed moved 21%")


def test_a_failed_run_raises_and_leaves_no_probes_of_its_own() -> None:
    speed = MachineSpeed(probe=lambda: 10.0)

    def fails() -> dict:
        raise RuntimeError("contender failed")

    with pytest.raises(RuntimeError):
        speed.around(0, fails)
    assert speed.rounds == [[]]
    # A round with no probe keeps its place (later rounds keep their numbers) and flags nothing.
    assert speed.round_drift() == [None] and report_lines(speed.report()) == []
