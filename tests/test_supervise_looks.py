"""A scheduler that is up but answers nothing (here: SIGSTOPped, a real `dask scheduler`
process) must not hold a run forever: every look at it is bounded (flows.supervise), and one
that answers none for the scheduler timeout is lost, as an unreachable one is."""

from __future__ import annotations

import os
import signal
import time
from datetime import timedelta
from pathlib import Path

import pytest

from flows.supervise import LOOK_TIMEOUT_S, ClusterWatch, InfrastructureError
from tests.dask_cluster import CommandLineCluster


def test_looks_at_a_scheduler_that_answers_nothing_are_bounded_and_it_counts_as_lost(
        tmp_path: Path) -> None:
    cluster = CommandLineCluster(tmp_path, n_workers=1)
    try:
        watch = ClusterWatch(cluster.address, "r", timedelta(seconds=30))
        try:
            assert watch.worker_count() == 1 and watch.answering()
            os.kill(cluster.scheduler.pid, signal.SIGSTOP)
            looked = time.monotonic()
            assert watch.worker_count() == -1  # unknown, after the look's own timeout
            assert LOOK_TIMEOUT_S - 1 < time.monotonic() - looked < LOOK_TIMEOUT_S + 5
            assert not watch.answering() and not watch.scheduler_reachable()
            # The timeout counts from the first unanswered look: already past, so at once.
            with pytest.raises(InfrastructureError, match=r"unreachable for 5 s during a test "
                                                          r"\(cluster lost\)"):
                watch.ensure_scheduler(timedelta(seconds=5), "a test")
            os.kill(cluster.scheduler.pid, signal.SIGCONT)
            watch.ensure_scheduler(timedelta(seconds=60), "a test")  # answered again: back
            assert watch.answering() and watch.scheduler_reachable()
        finally:
            os.kill(cluster.scheduler.pid, signal.SIGCONT)
            watch.close()
    finally:
        cluster.close()
