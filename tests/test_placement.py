"""Issue 7 (18): the warm worker is a preference, never a pin that strands a group.

(The group's start is measured where placement happens, in the scheduler's transition log:
a fresh worker's first Prefect task run adds seconds of imports that are not placement.)

Real Prefect API, real LocalCluster with nannies: the worker that ran the last group is
SIGKILLed and the next group is submitted at once, through the flow's own placement. It must
start on another worker (the spare, or the restarted one) by Dask's own scheduling, not after
the stranded-task watcher resubmits it.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from datetime import timedelta

import pytest
from distributed import Client, LocalCluster, get_worker
from prefect import flow, task
from prefect.cache_policies import NONE as NO_CACHE
from prefect_dask import DaskTaskRunner

from flows.group_submit import submit_supervised
from flows.supervise import ClusterWatch, Watchdog
from flows.train import _placement

pytestmark = pytest.mark.slow


@task(cache_policy=NO_CACHE, persist_result=False)
def where() -> tuple[str, float]:
    """Which worker ran this, and when it started."""
    return get_worker().address, time.time()


@flow
def warm_worker_dies_between_groups(address: str) -> dict:
    watch = ClusterWatch(address, "placement", timedelta(seconds=30))
    infra: list[str] = []
    try:
        def group(warm: str | None) -> tuple[str, float]:
            return submit_supervised(where.submit,
                                     lambda pinned: _placement(False, warm if pinned else None,
                                                               watch),
                                     watch, Watchdog(), "steps", 2,
                                     lambda kind, reason: infra.append(kind))

        warm, _ = group(None)
        with Client(address, set_as_default=False) as client:
            pid = client.run(os.getpid, workers=[warm])[warm]
        os.kill(pid, signal.SIGKILL)
        killed_unix = time.time()
        ran_on, started_unix = group(warm)  # submitted while the scheduler learns of the death
    finally:
        watch.close()
    return {"warm": warm, "ran_on": ran_on, "killed_unix": killed_unix,
            "started_unix": started_unix, "infra": infra}


@pytest.fixture(params=[2, 1], ids=["hot-spare", "no-spare"])
def cluster(request: pytest.FixtureRequest) -> Iterator[LocalCluster]:
    with LocalCluster(n_workers=request.param, threads_per_worker=1, processes=True,
                      host="127.0.0.1", dashboard_address="127.0.0.1:0") as local:
        yield local


def test_group_after_its_warm_worker_died_is_not_stranded(prefect_api: str,
                                                          cluster: LocalCluster) -> None:
    address = cluster.scheduler_address
    out = warm_worker_dies_between_groups.with_options(
        task_runner=DaskTaskRunner(address=address))(address)
    assert out["ran_on"] != out["warm"]
    assert "stranded-task" not in out["infra"], out["infra"]  # no watcher resubmission
    with Client(address, set_as_default=False) as client:
        joined = [stamp for stamp, msg in client.get_events("all")
                  if isinstance(msg, dict) and msg.get("action") == "add-worker"
                  and msg.get("worker") == out["ran_on"]]
        placed = client.run_on_scheduler(_placed_on_a_worker)
    # The scheduler gave the group to a worker as soon as one could take it: at once to the
    # spare, or when the restarted worker joined; well before the watcher's threshold.
    ready = max([out["killed_unix"], *joined])
    assert placed[-1] - ready < Watchdog().stranded_after.total_seconds(), (placed, ready)


def _placed_on_a_worker(dask_scheduler: object = None) -> list[float]:
    """Runs on the scheduler: when each `where` task was last handed to a worker."""
    return [t.timestamp for t in dask_scheduler.transition_log  # type: ignore[attr-defined]
            if t.finish == "processing" and "where" in str(t.key)]
