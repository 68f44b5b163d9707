"""How fast the machine is right now, probed around every contender run of a bench.

A shared or virtual machine's speed drifts: on the day this was written, the same plain torch
step of the small preset took 0.51 s at one moment and 0.65 s forty minutes later, with nothing
else running. Contenders that run one after the other can then differ by more than any change
of code, and a ratio from such a round says more about the machine than about the contenders.
The benches alternate the order of the contenders over rounds; this probe says, in addition,
how much the machine itself moved during each round, so that a reader can tell.

The probe is float32 matrix products on every core (numpy: no torch import in the bench's own
process), over a fixed time: it runs between contender runs, never during one.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np

PROBE_SIZE = 768
"""Matrix side. Smaller products mostly measure BLAS's thread hand-offs: back to back on an idle
machine, 384 gave 71-92 GFLOP/s here, 768 gave 114-121."""

PROBE_S = 3.0
"""Seconds one probe takes: even idle, this machine's speed moves by several percent from one
second to the next."""

DRIFT_WARN = 0.10
"""A round whose probes moved by more than this (max/min - 1) is flagged."""


def machine_gflops(seconds: float = PROBE_S) -> float:
    """GFLOP/s of float32 matrix products on every core, measured now over `seconds`."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((PROBE_SIZE, PROBE_SIZE), dtype=np.float32)
    b = rng.standard_normal((PROBE_SIZE, PROBE_SIZE), dtype=np.float32)
    a @ b  # the BLAS thread pool starts on first use: not part of the measure
    products, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < seconds:
        a @ b
        products += 1
    return 2 * PROBE_SIZE**3 * products / elapsed / 1e9


class MachineSpeed:
    """Probes around each contender run, kept per round; what the bench reports of them."""

    def __init__(self, probe: Callable[[], float] = machine_gflops) -> None:
        self._probe = probe
        self.rounds: list[list[float]] = []
        """Every probe of each round, in the order taken."""

    def around(self, round_no: int, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """Run one contender between two probes; its result gains `machine_gflops` (their mean)."""
        while len(self.rounds) <= round_no:
            self.rounds.append([])
        before = self._probe()
        result = run()
        after = self._probe()
        self.rounds[round_no] += [before, after]
        result["machine_gflops"] = round((before + after) / 2, 2)
        return result

    def round_drift(self) -> list[float | None]:
        """Per round: how far its probes moved, max/min - 1 (0.15: the machine was 15% faster
        at one moment of that round than at another); None for a round with no probe."""
        return [round(max(p) / min(p) - 1, 4) if p and min(p) > 0 else None for p in self.rounds]

    def report(self) -> dict[str, Any]:
        """For --json: every probe, each round's drift and the limit a round is flagged at."""
        probes = [p for r in self.rounds for p in r]
        return {"probe": f"numpy float32 {PROBE_SIZE}x{PROBE_SIZE} matmul, GFLOP/s",
                "gflops_median": round(statistics.median(probes), 2) if probes else None,
                "rounds": [[round(p, 2) for p in r] for r in self.rounds],
                "round_drift": self.round_drift(), "drift_warn": DRIFT_WARN}


def report_lines(report: dict[str, Any]) -> list[str]:
    """What a bench prints after its table, from MachineSpeed.report(): the speed, and every
    round that moved by more than the limit."""
    probes = [p for r in report["rounds"] for p in r]
    if not probes:
        return []
    out = [f"machine speed around the runs ({report['probe']}): {report['gflops_median']:.1f} "
           f"({min(probes):.1f}-{max(probes):.1f})"]
    for round_no, drift in enumerate(report["round_drift"]):
        if drift is not None and drift > report["drift_warn"]:
            out.append(f"round {round_no + 1}: the machine's speed moved {drift:.0%} between its "
                       "probes: its ratio says more about the machine than about the contenders")
    return out
