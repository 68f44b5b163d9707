"""Issue 7 (5): a task that itself raises TimeoutError (an OSError) is a task error: retried by
Prefect as such, then raised to the flow; the coordinator never takes it for its own fetch
timing out and never spins. Real Prefect API, real multi-process Dask cluster."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from distributed import LocalCluster
from prefect import flow, task
from prefect.cache_policies import NONE as NO_CACHE
from prefect_dask import DaskTaskRunner

from flows.group_submit import submit_supervised
from flows.supervise import ClusterWatch, Watchdog

pytestmark = pytest.mark.slow


@task(retries=1, retry_delay_seconds=0, cache_policy=NO_CACHE, persist_result=False)
def lock_times_out(marker: str) -> None:
    """A task whose own wait times out, as a socket or a file lock would."""
    with open(marker, "a") as f:
        f.write("attempt\n")
    raise TimeoutError("the task's own lock wait timed out")


@flow
def supervised_once(address: str, marker: str) -> list[str]:
    watch = ClusterWatch(address, "timeout-task", timedelta(seconds=30))
    infra: list[str] = []
    try:
        submit_supervised(lambda: lock_times_out.submit(marker),
                          lambda pinned: contextlib.nullcontext(), watch, Watchdog(),
                          "steps 0-10", 2, lambda kind, reason: infra.append(kind))
    finally:
        watch.close()
    return infra


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as local:
        yield local


@pytest.mark.timeout(180)  # the bug this guards against is an endless loop
def test_task_raising_timeout_error_fails_as_a_task_error(prefect_api: str, tmp_path: Path,
                                                          cluster: LocalCluster) -> None:
    marker = tmp_path / "attempts"
    runner = DaskTaskRunner(address=cluster.scheduler_address)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match="the task's own lock wait timed out"):
        supervised_once.with_options(task_runner=runner)(cluster.scheduler_address, str(marker))
    # Retried once by Prefect (a task error), then raised: no fetch-timeout rounds of 10 s.
    assert marker.read_text().count("attempt") == 2
    assert time.monotonic() - started < 60
