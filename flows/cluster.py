"""The Dask cluster a run trains on: a LocalCluster we start, or an existing scheduler."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import dask
from distributed import Client, LocalCluster

from flows.gpu_probe import cuda_available
from flows.versions import check_versions
from flows.worker_forkserver import PRE_SPAWN_ENV
from tasks.priority import BOOT_PRIORITY_ENV

# A flow started by a Prefect worker (a deployment) never passes through the CLI's check.
check_versions()

CLUSTER_START_TIMEOUT = timedelta(seconds=120)

__all__ = ["CLUSTER_LISTENERS", "MANAGERS", "cluster_gone", "cuda_available", "give_up_on", "local_cluster",
           "rescale"]

MANAGERS: dict[str, Any] = {}
"""Scheduler address -> the LocalCluster this process started, while it runs. The CLI starts the
cluster and hands the flow only its address (a Prefect parameter cannot hold a live object):
the flow, in the same process, finds the manager here to ask it for replacement workers
(flows/redundancy.py). An address missing here is an external cluster: no manager. A cluster
kept between runs (flows/kept_cluster.py) is managed from its own process, through a proxy."""


CLUSTER_LISTENERS: list[Callable[[str], None]] = []
"""Called with the scheduler address of a cluster the flow started to replace a lost one (the
CLI's progress view follows the run there)."""


def cluster_gone(address: str) -> str | None:
    """Why the cluster at `address` is known to be gone for good (the process that held it
    died or was stopped: a kept cluster), in one line; None when nothing says so (it may come
    back)."""
    lost = getattr(MANAGERS.get(address), "lost", None)
    return lost() if lost is not None else None


def give_up_on(address: str, why: str) -> str | None:
    """Put down the cluster at `address`, which can serve the run no more (its scheduler does
    not answer), when this process may (a kept cluster: by its server's PID); then what
    cluster_gone says of it, else None (a --cluster is not ours to stop)."""
    put_down = getattr(MANAGERS.get(address), "put_down", None)
    if put_down is None:
        return None
    put_down(why)
    return cluster_gone(address)


DASK_SETTINGS = {
    # A worker is declared dead when its heartbeats stop for this long. Our batch groups are
    # compute-bound for many seconds, but torch releases the GIL, so heartbeats keep flowing:
    # keep it short enough that a hung *process* is noticed, long enough for a busy one.
    "distributed.scheduler.worker-ttl": "60s",
    # A task whose worker died is rescheduled this many times before KilledWorker; Rebound
    # recovers from KilledWorker itself, so a small number keeps a poisoned task from hopping.
    "distributed.scheduler.allowed-failures": 3,
    "distributed.comm.timeouts.connect": "30s",
    # Training is sequential state: never let Dask move or steal a running batch group.
    "distributed.scheduler.work-stealing": False,
    # Dask's default also sets MALLOC_TRIM_THRESHOLD_=65536 in each worker, which turns off
    # glibc's adaptive trimming: torch's large, repeated allocations are then returned to the
    # OS and faulted back in every step. Measured here: 0.37 s/step instead of 0.25 (small
    # preset, 2 threads). Keep the thread caps, drop the trim threshold.
    # Dask's statistical profiler walks every worker thread's stack each 10 ms; on a training
    # step's Python-heavy parts that cost ~8% here. Rebound's progress events say enough.
    "distributed.worker.profile.enabled": False,
    # Every Dask server (scheduler, client, each nanny and worker) wakes every 20 ms to check
    # that its event loop is not blocked, samples CPU and memory with psutil every 500 ms, and
    # each worker checks its memory every 100 ms. On 2 cores that stole 8.6 CPU-s per minute of
    # training (the coordinator's IO loop 4.4, the idle spare 1.3) and slowed steps to 0.468 s
    # against a plain loop's 0.428 (small preset); at 1 s / 5 s / 1 s it was 3.0 CPU-s and
    # 0.437 s. A blocked loop is still reported (tick.limit, 3 s), the memory limits still act.
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "5s",
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.nanny.pre-spawn-environ": dict(PRE_SPAWN_ENV),
}


def _env_name(key: str) -> str:
    return "DASK_" + key.upper().replace(".", "__").replace("-", "_")


def dask_settings() -> dict[str, object]:
    """Our defaults, except where the environment sets a key (an operator, or a test)."""
    return {k: v for k, v in DASK_SETTINGS.items() if _env_name(k) not in os.environ}


@contextmanager
def local_cluster(n_workers: int, local_directory: Path, use_gpu: bool,
                  boot_low: bool = True) -> Iterator[LocalCluster]:
    """A LocalCluster of single-threaded process workers on 127.0.0.1, stopped on exit.

    boot_low: workers boot at the lowest priority (tasks/preload.py), so that one restarted
    after a crash does not slow the spare taking over. Cold standby has no spare: the worker
    started after a failure is the one the run waits for, and it boots at normal priority.
    """
    local_directory.mkdir(parents=True, exist_ok=True)
    with dask.config.set(dask_settings()):
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            host="127.0.0.1",
            dashboard_address="127.0.0.1:0",
            silence_logs=logging.ERROR,
            local_directory=str(local_directory),
            preload=["tasks.preload"],
            resources={"GPU": 1} if use_gpu else None,
            env={} if boot_low else {BOOT_PRIORITY_ENV: "normal"},
        )
    address = cluster.scheduler_address
    MANAGERS[address] = cluster
    try:
        yield cluster
    finally:
        MANAGERS.pop(address, None)
        cluster.close(timeout=30)


def worker_pids(client: Client) -> dict[str, int]:
    """Worker address -> PID of its worker process (the nanny's child)."""
    return dict(client.run(os.getpid))


def count_workers(address: str, wanted: int, timeout: timedelta) -> int | None:
    """Workers the scheduler at address has, waiting up to timeout for `wanted` of them;
    None when the scheduler cannot be reached (the run itself then reports the lost cluster)."""
    try:
        client = Client(address, timeout=timeout.total_seconds(), set_as_default=False)
    except (OSError, TimeoutError):
        return None
    with client:
        try:
            client.wait_for_workers(wanted, timeout=timeout.total_seconds())
        except TimeoutError:
            pass
        return len(client.scheduler_info(n_workers=-1)["workers"])


def running_workers(watch: Any) -> set[str]:
    """Addresses of the workers of `watch`'s scheduler (a flows.supervise.ClusterWatch) that
    can take a task now; empty when unknown (a look unanswered within its bound included)."""
    try:
        workers = watch.workers()
    except Exception:  # noqa: BLE001 - unreachable: the caller's watcher reports a lost cluster
        return set()
    return {addr for addr, info in workers.items() if info.get("status", "running") == "running"}


def rescale(manager: Any, drop: str | None, target: int, fresh: str) -> None:
    """Bring `manager` (a SpecCluster) back to `target` workers; the slot running worker `drop`
    (a quarantined one) is given to a new worker named `fresh` first. Runs on the manager's
    event loop."""
    slot = _slot_of(manager, drop) if drop is not None else None
    if slot is not None and manager.worker_spec.pop(slot, None) is not None:
        # A new name, never the dropped one: SpecCluster.new_worker_spec would hand the
        # dropped name out again, and a slot whose name is still open starts nothing.
        [spec] = manager.new_worker_spec().values()
        manager.worker_spec[fresh] = spec
    manager.scale(target)


def _slot_of(manager: Any, worker: str) -> Any | None:
    """The SpecCluster slot (worker_spec name) running `worker`, None when it has none."""
    if not hasattr(manager, "worker_spec"):
        return None
    name = manager.scheduler_info.get("workers", {}).get(worker, {}).get("name")
    if name in manager.worker_spec:
        return name
    for slot, nanny in list(manager.workers.items()):
        if getattr(nanny, "worker_address", None) == worker:
            return slot
    return None
