"""Local workers forked from one warm process instead of spawned as fresh interpreters.

Each spawned Dask worker imports what it trains with before its first step: ~6 s on one core
here (torch ~1.8, the compiler stack AdamW's first step loads ~1.4, Prefect ~1.5), and a worker
restarted after a crash pays it again. A forkserver imports it once, started as the CLI's first
act so that its imports overlap the coordinator's own; workers, restarts included, fork from it
in milliseconds. Importing runs no torch op, so the server holds no thread pool and no CUDA
context that a fork could break.

This module imports neither Dask nor torch: it must run before both.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os

WORKER_PRELOAD = ("flows.forkserver_guard", "distributed", "numpy", "torch", "torch._dynamo",
                  "prefect", "storage", "tasks.train_batch_group", "tasks.group_runner")
"""What every worker process needs before its first step (after the guard that ends the
server with the CLI)."""

METHOD_ENV = "DASK_DISTRIBUTED__WORKER__MULTIPROCESSING_METHOD"

PRE_SPAWN_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
"""Thread caps every worker gets (Dask's nanny default, flows/cluster.py). A forked worker has
the server's environment, so they are set before the server starts."""


def start_worker_forkserver() -> bool:
    """Make this process's local Dask workers fork from a server that imported WORKER_PRELOAD,
    and start that server now. Process-wide, restarts included (Dask reads the method at
    every worker start), so only for a process that runs one flow: the CLI. A forked worker
    sees the environment of this moment: call it after flows.prefect_env set Prefect's.

    False (nothing changed) where the platform has no forkserver or the environment already
    chose a start method. The server exits when this process does.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods() or METHOD_ENV in os.environ:
        return False
    os.environ[METHOD_ENV] = "forkserver"  # read by Dask's config at its import
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    for key, value in PRE_SPAWN_ENV.items():
        os.environ.setdefault(key, value)
    multiprocessing.forkserver.set_forkserver_preload(list(WORKER_PRELOAD))
    multiprocessing.forkserver.ensure_running()
    return True
