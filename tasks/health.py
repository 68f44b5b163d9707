"""The health probe a batch group runs on its worker before it trains (redundancy: quarantine).

It checks what a group needs from its worker: torch computes correctly, the store takes a write
and gives it back, and there is memory to spare. A worker that fails is reported with
WorkerUnhealthy; the flow quarantines it (retires it from the cluster) and the group runs on
another worker, a spare when there is one.
"""

from __future__ import annotations

import os
import time

import torch

from storage.store import CheckpointStore

MIN_FREE_MEMORY_BYTES = 256 * 2**20
"""Below this much available memory a worker is about to be OOM-killed: don't start there."""


class WorkerUnhealthy(RuntimeError):
    """This worker failed its health probe; never retried on the same worker."""

    def __init__(self, worker: str | None, reason: str) -> None:
        super().__init__(f"worker {worker} failed its health probe: {reason}")
        self.worker = worker
        self.reason = reason

    def __reduce__(self) -> tuple:
        return (WorkerUnhealthy, (self.worker, self.reason))


def _available_memory_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def probe(store: CheckpointStore, run_id: str, worker: str | None) -> None:
    """Raise WorkerUnhealthy unless this worker can compute, reach the store and has memory."""
    a = torch.arange(16, dtype=torch.float32).reshape(4, 4)
    # Column sums (24, 28, 32, 36) dotted with row sums (6, 22, 38, 54): exact in float32.
    if float((a @ a).sum()) != 3920.0:
        raise WorkerUnhealthy(worker, "torch computes wrong results")
    name = f"health/{os.getpid()}"
    stamp = {"unix": time.time(), "worker": worker}
    # A store that refuses the write (full disk, read-only: FatalStoreError) or fails it
    # transiently is the run's storage failure, not this worker's: it propagates as is, and
    # quarantining workers one after another could not help.
    store.write_json(run_id, name, stamp)
    if store.read_json(run_id, name) != stamp:
        raise WorkerUnhealthy(worker, "the store returned other bytes than written")
    free = _available_memory_bytes()
    if free is not None and free < MIN_FREE_MEMORY_BYTES:
        raise WorkerUnhealthy(worker, f"only {free // 2**20} MiB of memory available")
