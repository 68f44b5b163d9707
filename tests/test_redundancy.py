"""Redundancy on a real multi-process cluster (issue 9): a cold spare starts only when a rank is
lost, an unhealthy worker is quarantined and replaced, and the cluster keeps its size. Every run
ends with the uninterrupted run's state_hash."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch

from storage import open_store
from tasks import health
from tests.cli_helpers import cli_args, kill_group, read_summary, start_cli
from tests.dask_cluster import BIN, _spawn
from tests.test_data_parallel_e2e import _finish, _rank_doc, _run, _wait_for_ranks

PATIENT = ("--no-worker-timeout", "3m")
"""A replacement boots at low priority (tasks/priority.py): on a machine loaded by other test runs
it has taken ~60 s to join, the default bound on waiting for a worker. Timing only: the runs'
state is the same."""
COLD_W2 = ("--workers", "2", "--standby", "cold", "--spares", "1", *PATIENT)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("redundancy")


@pytest.fixture(scope="module")
def cold_reference(prefect_api: str, workdir: Path, corpus: Path) -> dict[str, Any]:
    """--workers 2 with a cold spare and no failure: what the interrupted cold run must match."""
    done, summary = _run(workdir, corpus, "cold-ref", *COLD_W2, "--group-steps", "20")
    assert done.returncode == 0, done.stderr[-3000:]
    return summary


def _worker_processes(cli_pid: int) -> set[int]:
    """PIDs of the Dask worker processes the CLI's LocalCluster runs: its nannies live in the
    CLI process and fork each worker from the CLI's forkserver (flows/worker_forkserver.py),
    so they are that server's children (a fork keeps the server's command line)."""
    servers = [p for p in psutil.Process(cli_pid).children()
               if "forkserver" in " ".join(p.cmdline())]
    return {worker.pid for server in servers for worker in server.children()}


def _summary_artifact(run_id: str) -> str:
    """The markdown of the run's `rebound-summary` artifact in the tests' Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["rebound-summary"])))
    [markdown] = [str(a.data) for a in found if f"run `{run_id}`" in str(a.data)]
    return markdown


def _quarantined_and_replaced(summary: dict[str, Any], worker: str) -> dict[str, Any]:
    """Assert `worker` was quarantined and a new worker joined in its place, the cluster ending
    at the size it started with; returns the replacement."""
    red = summary["redundancy"]
    assert [q["worker"] for q in red["quarantined"]] == [worker], red
    [replacement] = red["replacements"]
    assert replacement["for"] == worker and replacement["why"] == "quarantined", red
    assert replacement["worker"] not in (None, worker), red
    assert replacement["joined_unix"] >= replacement["requested_unix"], red
    size = red["cluster_size"]
    assert size["end"] == size["start"] == size["target"], red
    return replacement


def test_the_start_probe_checks_the_device_the_worker_offers(tmp_path: Path) -> None:
    """What tasks/preload.py runs at worker start: a worker offering a GPU without a usable one
    fails it, and the first group that meets the worker reports it unhealthy."""
    store = open_store(str(tmp_path / "store"))
    assert health.device_fault("cpu") is None
    try:
        verdict = health.start_probe(use_cuda=True)
        assert (verdict is None) == torch.cuda.is_available(), verdict
        if verdict is None:
            health.probe(store, "probe-run", "this-worker")
        else:
            with pytest.raises(health.WorkerUnhealthy, match="start-up probe"):
                health.probe(store, "probe-run", "this-worker")
    finally:
        assert health.start_probe(use_cuda=False) is None  # this process's verdict: the CPU's
    health.probe(store, "probe-run", "this-worker")


@pytest.mark.slow
def test_without_a_cluster_manager_the_next_worker_to_join_replaces(tmp_path: Path) -> None:
    """On a cluster the flow did not start (no manager in flows.cluster.MANAGERS) a worker on
    which groups failed --max-failures-per-worker times is quarantined, and the replacement is
    the next worker to join: here the operator's own scale-up."""
    from distributed import LocalCluster
    from rich.console import Console

    from flows.params import TrainParams
    from flows.progress_view import ProgressView
    from flows.redundancy import Provisioner, redundancy_state
    from flows.supervise import ClusterWatch

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0", local_directory=str(tmp_path)) as cluster, \
            ProgressView(Console(file=io.StringIO()), "ext", 40, 0) as view:
        view.attach(cluster.scheduler_address)
        watch = ClusterWatch(cluster.scheduler_address, "ext", timedelta(seconds=30))
        operator_worker: subprocess.Popen | None = None
        try:
            params = TrainParams(cluster=cluster.scheduler_address, no_worker_timeout="60s")
            watch.keep_size(Provisioner.for_run(watch, params), 3)
            victim = sorted(watch.client.scheduler_info(n_workers=-1)["workers"])[0]
            assert not watch.count_failure(victim, "task-error")
            assert not watch.count_failure(victim, "task-error")
            assert watch.count_failure(victim, "task-error")  # the third: quarantined
            assert not watch.count_failure(victim, "task-error")  # counted no more
            deadline = time.monotonic() + 60
            while watch.worker_count() != 1:  # closed for good, nothing started in its place
                assert time.monotonic() < deadline, watch.worker_count()
                time.sleep(0.1)
            assert [r.for_worker for r in watch.provisioner.pending()] == [victim]
            # The operator adds one worker of their own (scaling the LocalCluster instead would
            # start one or two, depending on whether it has dropped the closed one's slot yet).
            operator_worker = _spawn(
                [str(BIN / "dask"), "worker", cluster.scheduler_address, "--nthreads", "1",
                 "--host", "127.0.0.1", "--dashboard-address", "127.0.0.1:0",
                 "--local-directory", str(tmp_path / "operator")], tmp_path / "operator.log")
            while watch.provisioner.pending():
                assert time.monotonic() < deadline, "the new worker never joined"
                time.sleep(0.1)
            state = redundancy_state(watch, None, None)
            # The local progress view got the same story as scheduler events. The victim's
            # departure may reach the watch after the new worker's arrival (a moment with 3
            # workers, spares 2): the line settles on the story's end.
            line = ""
            while line != "hot · spares 1 · quarantined 1":
                assert time.monotonic() < deadline, line
                time.sleep(0.05)  # polling: the view's field, set on the event thread
                line = view._progress.tasks[0].fields["redundancy"]
        finally:
            watch.close()
            if operator_worker is not None:
                kill_group(operator_worker)
    assert state is not None
    assert state["cluster_size"] == {"start": 2, "end": 2, "target": 2}, state
    [quarantined] = state["quarantined"]
    assert quarantined["worker"] == victim and "3 batch group(s) failed" in quarantined["reason"]
    [replacement] = state["replacements"]
    assert replacement["for"] == victim and replacement["worker"] not in (None, victim)


@pytest.mark.slow
def test_cold_spare_starts_only_when_a_rank_is_lost(cold_reference: dict[str, Any],
                                                    workdir: Path, corpus: Path) -> None:
    before_failure = cold_reference["redundancy"]
    assert before_failure["standby"] == "cold" and before_failure["spares"] == []
    assert before_failure["cluster_size"] == {"start": 2, "end": 2, "target": 2}
    store, run_id = workdir / "store", "cold-kill"
    summary_path = workdir / f"{run_id}.json"
    proc = start_cli(cli_args(store, corpus, run_id, *COLD_W2, "--group-steps", "20",
                              "--summary-json", str(summary_path)))
    try:
        docs = _wait_for_ranks(proc, store, run_id, 40, (0, 1))
        workers = _worker_processes(proc.pid)
        # Exactly the ranks' processes: no spare process runs before the failure.
        assert workers == {d["pid"] for d in docs}, (workers, docs)
        os.kill(docs[1]["pid"], signal.SIGKILL)  # from outside, by PID, mid-group
        rc, err = _finish(proc)
    finally:
        kill_group(proc)
    assert rc == 0, err[-3000:]
    summary = read_summary(summary_path)
    assert summary["state_hash"] == cold_reference["state_hash"]
    # A new worker process took the rank.
    after = _rank_doc(store, run_id, 1)
    assert after["pid"] not in workers and after["last_step"] == 40
    [failure] = summary["failures"]
    assert failure["kind"] == "worker-lost"
    red = summary["redundancy"]
    [replacement] = red["replacements"]
    assert replacement["why"] == "lost" and replacement["for"] == failure["worker"]
    assert red["roles"].get(replacement["worker"]) is not None, red  # it holds a rank
    # What cold costs: the rank waited for the new worker to start.
    assert 0 < failure["replacement_s"] <= failure["recovered_after_s"], failure
    assert red["cluster_size"] == {"start": 2, "end": 2, "target": 2}, red


@pytest.mark.slow
def test_a_worker_failing_its_probe_is_quarantined_and_replaced(
        reference: dict[str, Any], workdir: Path, corpus: Path) -> None:
    done, summary = _run(workdir, corpus, "probe-replaced", "--chaos", "fail-probe@23",
                         *PATIENT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert summary["state_hash"] == reference["state_hash"]
    fired = open_store(str(workdir / "store")).read_json("probe-replaced",
                                                          "chaos/fail-probe@23")
    replacement = _quarantined_and_replaced(summary, fired["worker"])
    [quarantined] = summary["redundancy"]["quarantined"]
    assert "fail-probe@23" in quarantined["reason"]
    [failure] = summary["failures"]
    assert failure["kind"] == "fail-probe" and failure["worker"] == fired["worker"]
    assert failure["replacement_s"] == pytest.approx(
        replacement["joined_unix"] - replacement["requested_unix"], abs=1e-3)
    # The Prefect UI shows the same: the summary artifact's redundancy section.
    markdown = _summary_artifact("probe-replaced")
    assert "## Redundancy" in markdown and "cluster size 2 at the start, 2 at the end" in markdown
    assert f"| {fired['worker']} | quarantined | chaos: fail-probe@23 |" in markdown
    assert f"| {replacement['worker']} | replacement | for {fired['worker']}" in markdown


@pytest.mark.slow
def test_a_worker_with_too_many_failed_groups_is_quarantined_and_replaced(
        reference: dict[str, Any], workdir: Path, corpus: Path) -> None:
    done, summary = _run(workdir, corpus, "errors-replaced", "--chaos", "raise@13",
                         "--max-failures-per-worker", "1", *PATIENT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert summary["state_hash"] == reference["state_hash"]
    fired = open_store(str(workdir / "store")).read_json("errors-replaced", "chaos/raise@13")
    _quarantined_and_replaced(summary, fired["worker"])
    [quarantined] = summary["redundancy"]["quarantined"]
    assert "1 batch group(s) failed" in quarantined["reason"]
    assert "--max-failures-per-worker 1" in quarantined["reason"]


@pytest.mark.slow
def test_a_rank_failing_its_probe_under_cold_standby_waits_for_its_replacement(
        cold_reference: dict[str, Any], workdir: Path, corpus: Path) -> None:
    # No spare runs: the quarantined rank's place is taken by the worker started for it. (Its
    # peer learns of the failure by its collective timing out: keep that short.)
    done, summary = _run(workdir, corpus, "cold-probe", *COLD_W2, "--group-steps", "20",
                         "--chaos", "fail-probe@25/1", "--collective-timeout", "5s")
    assert done.returncode == 0, done.stderr[-3000:]
    assert summary["state_hash"] == cold_reference["state_hash"]
    [failure] = summary["failures"]
    replacement = _quarantined_and_replaced(summary, failure["worker"])
    assert summary["redundancy"]["roles"].get(replacement["worker"]) is not None
    assert 0 < failure["replacement_s"] <= failure["recovered_after_s"], failure
