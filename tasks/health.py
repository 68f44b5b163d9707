"""The health probes of a worker (redundancy: quarantine).

Two moments: at worker start (tasks/preload.py: the device is usable, a small matmul gives its
known result, memory is free; no store there) and before every batch group, so also after every
failure (a failed group runs again): the same checks plus the store taking a write and giving it
back. A worker that fails either is reported with WorkerUnhealthy when a group meets it; the
flow quarantines it (retires it from the cluster, and has it replaced) and the group runs on
another worker, a spare when there is one.
"""

from __future__ import annotations

import os
import time

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


_start_failure: str | None = None
"""Why this worker process failed its start-up probe (None: passed, or never probed)."""


def device_fault(device: str = "cpu") -> str | None:
    """Why `device` cannot be trained on here (None: it can): a small matmul checked against
    its known result, and free memory (the host's, and the GPU's for a CUDA device)."""
    import torch  # only where the probe runs: the coordinator imports this module for its errors

    try:
        a = torch.arange(16, dtype=torch.float32, device=device).reshape(4, 4)
        # Column sums (24, 28, 32, 36) dotted with row sums (6, 22, 38, 54): exact in float32.
        if float((a @ a).sum()) != 3920.0:
            return f"torch computes wrong results on {device}"
        if device.startswith("cuda"):
            free_gpu, _ = torch.cuda.mem_get_info(torch.device(device))
            if free_gpu < MIN_FREE_MEMORY_BYTES:
                return f"only {free_gpu // 2**20} MiB free on {device}"
    except (RuntimeError, AssertionError) as err:  # no driver, no device, device lost
        return f"{device} unusable: {type(err).__name__}: {str(err).splitlines()[0]}"
    free = _available_memory_bytes()
    if free is not None and free < MIN_FREE_MEMORY_BYTES:
        return f"only {free // 2**20} MiB of memory available"
    return None


def start_probe(use_cuda: bool) -> str | None:
    """Probe this worker at start-up (its GPU when it offers one) and remember the verdict
    for the first group that meets it; returns the fault, if any."""
    global _start_failure
    import torch

    device = f"cuda:{torch.cuda.current_device()}" if use_cuda and \
        torch.cuda.is_available() else "cpu"
    if use_cuda and device == "cpu":
        _start_failure = "the worker offers a GPU but CUDA is not available"
    else:
        _start_failure = device_fault(device)
    return _start_failure


def probe(store: CheckpointStore, run_id: str, worker: str | None) -> None:
    """Raise WorkerUnhealthy unless this worker passed its start-up probe, can compute, reach
    the store and has memory."""
    if _start_failure is not None:
        raise WorkerUnhealthy(worker, f"start-up probe: {_start_failure}")
    fault = device_fault()
    if fault is not None:
        raise WorkerUnhealthy(worker, fault)
    name = f"health/{os.getpid()}"
    stamp = {"unix": time.time(), "worker": worker}
    # A store that refuses the write (full disk, read-only: FatalStoreError) or fails it
    # transiently is the run's storage failure, not this worker's: it propagates as is, and
    # quarantining workers one after another could not help.
    store.write_json(run_id, name, stamp)
    if store.read_json(run_id, name) != stamp:
        raise WorkerUnhealthy(worker, "the store returned other bytes than written")
