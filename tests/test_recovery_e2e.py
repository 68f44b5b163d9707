"""Recovery under real failures (issue 4): each failure injected for real on a real
multi-process Dask cluster, and the run ends with the uninterrupted run's state_hash."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from datetime import UTC
from pathlib import Path
from typing import Any

import pytest

from storage import open_store
from tests.cli_helpers import (
    CKPT,
    cli_args,
    committed_steps,
    kill_group,
    read_summary,
    run_cli,
    start_cli,
    verify_store,
)
from tests.dask_cluster import CommandLineCluster

pytestmark = pytest.mark.slow

BOUND_S = 60.0
"""A failed run must have exited within this long of the failure."""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("recovery")


def _attempts(store: Path | str, run_id: str) -> list[dict[str, Any]]:
    return [doc for _, doc in open_store(str(store)).list_json(run_id, "attempts")]


def _run(workdir: Path, corpus: Path, run_id: str, *extra: str,
         store: str | None = None) -> tuple[subprocess.CompletedProcess, dict[str, Any]]:
    summary_path = workdir / f"{run_id}.json"
    done = run_cli(cli_args(store or workdir / "store", corpus, run_id, *extra,
                            "--summary-json", str(summary_path)))
    return done, read_summary(summary_path)


def _one_line_error(stderr: str) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def _wait_for_checkpoint(proc: subprocess.Popen, store: Path, run_id: str, step: int) -> None:
    """Block until a checkpoint at or past step is committed (the CLI must still be running)."""
    while not any(s >= step for s in committed_steps(store, run_id)):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        time.sleep(0.05)  # polling the store: the event is a directory appearing on disk


def _break_mid_run(args: list[str], store: Path, run_id: str,
                   breaker: Callable[[], None]) -> tuple[int, str]:
    """Start the CLI, break something once step 10 is committed, and wait (bounded) for the
    CLI to end. Returns its exit status and stderr."""
    proc = start_cli(args)
    try:
        _wait_for_checkpoint(proc, store, run_id, 10)
        breaker()
        broken_at = time.monotonic()
        _, err = proc.communicate(timeout=BOUND_S)
        assert time.monotonic() - broken_at < BOUND_S
    finally:
        kill_group(proc)
    return proc.returncode, err


def test_worker_killed_mid_step_recovers_on_another_worker(reference: dict, workdir: Path,
                                                           corpus: Path) -> None:
    done, s = _run(workdir, corpus, "kill-worker", "--chaos", "kill-worker@17")
    assert done.returncode == 0, done.stderr[-3000:]
    assert s["status"] == "completed" and s["state_hash"] == reference["state_hash"]
    [failure] = s["failures"]
    assert failure["kind"] == "kill-worker" and failure["step"] == 17
    assert 0 <= failure["detected_after_s"] <= failure["recovered_after_s"]
    assert failure["lost_steps"] <= CKPT
    fired = open_store(str(workdir / "store")).read_json("kill-worker", "chaos/kill-worker@17")
    after = [a for a in _attempts(workdir / "store", "kill-worker")
             if a["started_unix"] > fired["fired_unix"]]
    assert after and all(a["pid"] != fired["pid"] for a in after)  # another process took over
    # The Prefect UI shows the same story: the run's summary artifact lists the failure.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    with get_client(sync_client=True) as client:
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["rebound-summary"])))
    [mine] = [a for a in artifacts if "run `kill-worker`" in str(a.data)]
    assert "| kill-worker | 17 |" in str(mine.data) and "tokens/s" in str(mine.data)


def test_killed_mid_save_uses_previous_checkpoint_and_reuses_chunks(reference: dict,
                                                                    workdir: Path,
                                                                    corpus: Path) -> None:
    done, s = _run(workdir, corpus, "kill-save", "--chaos", "kill-during-save@30")
    assert done.returncode == 0, done.stderr[-3000:]
    assert s["state_hash"] == reference["state_hash"]
    [failure] = s["failures"]
    assert failure["kind"] == "kill-during-save" and failure["lost_steps"] == CKPT
    retried = [a for a in _attempts(workdir / "store", "kill-save") if a.get("bytes_reused")]
    assert retried and retried[0]["resumed_from_step"] == 25
    assert verify_store(workdir / "store", "kill-save").returncode == 0


def test_bit_rot_injected_after_commit_is_detected_and_skipped(reference: dict, workdir: Path,
                                                               corpus: Path) -> None:
    done, s = _run(workdir, corpus, "rot", "--chaos", "corrupt-latest@20")
    assert done.returncode == 0, done.stderr[-3000:]
    assert s["state_hash"] == reference["state_hash"]
    assert [f["kind"] for f in s["failures"]] == ["corrupt-latest"]
    assert s["failures"][0]["lost_steps"] == CKPT
    assert s["failures"][0]["array"] and s["failures"][0]["chunk"]  # where the rot was found
    line = next(x for x in done.stderr.splitlines() if "corrupt checkpoint skipped" in x)
    assert "step 20" in line and "array" in line and "chunk" in line
    # Step 20 ends epoch 0: its evaluation meets the rot. Rereading it cannot help, so neither
    # the evaluation's retries nor the epoch's only retry are spent on it: the group is
    # trained again from step 15 and evaluated once more.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterName,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )

    with get_client(sync_client=True) as client:
        [epoch0] = client.read_flow_runs(flow_run_filter=FlowRunFilter(
            name=FlowRunFilterName(any_=["rot epoch 0"])))
        evals = [t for t in client.read_task_runs(task_run_filter=TaskRunFilter(
            flow_run_id=TaskRunFilterFlowRunId(any_=[epoch0.id]))) if t.name.startswith("eval")]
    assert epoch0.run_count == 1
    assert sorted(t.run_count for t in evals) == [1, 1]


def _flip_a_byte(step_dir: Path) -> Path:
    chunk = max((p for p in step_dir.rglob("*") if p.is_file() and p.parent.name != step_dir.name
                 and "c" in p.relative_to(step_dir).parts), key=lambda p: p.stat().st_size)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    return chunk


def test_byte_flipped_between_invocations_falls_back(reference: dict, workdir: Path,
                                                     corpus: Path) -> None:
    done, s = _run(workdir, corpus, "flipped", "--until", "20")
    assert done.returncode == 0 and s["final_step"] == 20, done.stderr[-3000:]
    step_dir = workdir / "store" / "flipped" / "ckpt" / f"{20:012d}"
    chunk = _flip_a_byte(step_dir)
    parts = chunk.relative_to(step_dir).parts
    array, key = "/".join(parts[:parts.index("c")]), "/".join(parts[parts.index("c"):])
    assert verify_store(workdir / "store", "flipped").returncode == 1
    done, s = _run(workdir, corpus, "flipped")
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stderr.splitlines() if "corrupt checkpoint skipped" in x)
    assert "step 20" in line and f"array {array!r}" in line and f"chunk {key!r}" in line
    assert s["resumed_from_step"] == 15
    assert s["state_hash"] == reference["state_hash"]
    assert verify_store(workdir / "store", "flipped").returncode == 0  # step 20 was written again
    # The summary tells it too: the corrupt checkpoint is a failure, with what was lost.
    [corrupt] = s["failures"]
    assert corrupt["kind"] == "corrupt-checkpoint" and corrupt["step"] == 20
    assert (corrupt["array"], corrupt["chunk"]) == (array, key)
    assert corrupt["lost_steps"] == CKPT and corrupt["restored_from"] == "checkpoint"


def test_coordinator_killed_resumes_without_retraining_committed_groups(reference: dict,
                                                                        workdir: Path,
                                                                        corpus: Path) -> None:
    store = workdir / "store"
    args = cli_args(store, corpus, "coordinator")
    proc = start_cli(args)
    try:
        _wait_for_checkpoint(proc, store, "coordinator", 20)
        os.kill(proc.pid, signal.SIGKILL)  # the flow process only: its cluster is orphaned
        proc.wait(timeout=30)
    finally:
        kill_group(proc)  # whatever it left behind, by process group
    committed_before = max(committed_steps(store, "coordinator"))
    rerun_at = time.time()
    done, s = _run(workdir, corpus, "coordinator")
    assert done.returncode == 0, done.stderr[-3000:]
    assert s["resumed_from_step"] == committed_before
    rerun_attempts = [a for a in _attempts(store, "coordinator") if a["started_unix"] >= rerun_at]
    assert rerun_attempts and all(a["last_step"] > committed_before for a in rerun_attempts)
    assert s["state_hash"] == reference["state_hash"]


def test_cluster_lost_fails_within_bounds_and_rerun_resumes(reference: dict, workdir: Path,
                                                            corpus: Path) -> None:
    store = workdir / "store"
    cluster = CommandLineCluster(workdir / "cluster-a", n_workers=2)
    try:
        args = cli_args(store, corpus, "cluster-lost", "--cluster", cluster.address,
                        "--cluster-timeout", "5s")
        returncode, err = _break_mid_run(args, store, "cluster-lost", cluster.kill_scheduler)
        assert returncode == 1, err[-3000:]
        assert "unreachable" in _one_line_error(err)
    finally:
        cluster.close()
    resumable = max(committed_steps(store, "cluster-lost"))
    cluster = CommandLineCluster(workdir / "cluster-b", n_workers=1)
    try:
        done, s = _run(workdir, corpus, "cluster-lost", "--cluster", cluster.address)
    finally:
        cluster.close()
    assert done.returncode == 0, done.stderr[-3000:]
    assert s["resumed_from_step"] == resumable
    assert s["state_hash"] == reference["state_hash"]


def test_hung_task_is_detected_and_rerun(reference: dict, workdir: Path, corpus: Path) -> None:
    done, s = _run(workdir, corpus, "hang", "--chaos", "hang@12", "--hang-timeout", "4s")
    assert done.returncode == 0, done.stderr[-3000:]
    assert s["state_hash"] == reference["state_hash"]
    [failure] = s["failures"]
    assert failure["kind"] == "hang" and failure["step"] == 12
    assert failure["detected_after_s"] >= 4


def test_every_worker_lost_fails_within_bounds(workdir: Path, corpus: Path) -> None:
    store = workdir / "store"
    cluster = CommandLineCluster(workdir / "cluster-c", n_workers=2)
    try:
        args = cli_args(store, corpus, "no-workers", "--cluster", cluster.address,
                        "--no-worker-timeout", "5s")
        returncode, err = _break_mid_run(args, store, "no-workers", cluster.kill_workers)
    finally:
        cluster.close()
    assert returncode == 1, err[-3000:]
    assert "every Dask worker lost" in _one_line_error(err)
    assert committed_steps(store, "no-workers")
    assert verify_store(store, "no-workers").returncode == 0


def test_flaky_storage_saves_are_retried(reference: dict, workdir: Path, corpus: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REBOUND_FLAKY_FIRST", "2")
    store = f"flaky://{workdir / 'flaky-store'}"
    done, s = _run(workdir, corpus, "flaky", store=store)
    assert done.returncode == 0, done.stderr[-3000:]
    assert s["state_hash"] == reference["state_hash"]
    assert sum(a.get("save_retries", 0) for a in _attempts(store, "flaky")) >= 1


def test_persistent_storage_failure_fails_clearly_committing_nothing(
        workdir: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REBOUND_FLAKY_P", "1.0")
    folder = workdir / "dead-store"
    done, s = _run(workdir, corpus, "dead", "--retries", "0", store=f"flaky://{folder}")
    assert done.returncode == 1
    assert "flaky storage" in _one_line_error(done.stderr)
    assert s["status"] == "failed" and s["final_step"] == 0
    assert committed_steps(folder, "dead") == []


def test_killed_worker_error_is_recovered_and_no_task_run_stays_running(
        reference: dict, workdir: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Trap: KilledWorker fails the flow and leaves the task run Running (prefect#12968,
    # prefect-dask#59). allowed-failures=0 makes the first worker death a KilledWorker.
    monkeypatch.setenv("DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES", "0")
    started = time.time()
    done, s = _run(workdir, corpus, "killed-worker", "--chaos", "kill-worker@13")
    assert done.returncode == 0, done.stderr[-3000:]
    assert s["state_hash"] == reference["state_hash"]
    assert "killed-worker" in [f["kind"] for f in s["failures"]]
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import TaskRunFilter, TaskRunFilterStartTime

    with get_client(sync_client=True) as client:
        from datetime import datetime

        runs = client.read_task_runs(task_run_filter=TaskRunFilter(
            start_time=TaskRunFilterStartTime(after_=datetime.fromtimestamp(started, UTC))))
    states = [r.state.type.value for r in runs if r.state is not None]
    assert "CRASHED" in states
    assert "RUNNING" not in states


def test_long_compute_bound_group_is_not_taken_for_a_dead_worker(
        workdir: Path, corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Trap: long compute-bound tasks trip heartbeats/TTL (distributed#6148, #5633). One group
    # of 600 steps runs several times longer than both the worker TTL and the hang timeout.
    monkeypatch.setenv("DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL", "2s")
    done, s = _run(workdir, corpus, "long-group", "--steps", "600", "--epoch-steps", "600",
                   "--group-steps", "600", "--ckpt-every", "600", "--hang-timeout", "3s")
    assert done.returncode == 0, done.stderr[-3000:]
    assert s["status"] == "completed" and s["failures"] == []
    attempts = _attempts(workdir / "store", "long-group")
    assert len(attempts) == len({a["last_step"] for a in attempts})  # each group ran once
    longest = max(a["ended_unix"] - a["ready_unix"] for a in attempts)
    assert longest > 3.0  # longer than the hang timeout and the worker TTL


def test_worker_failing_its_health_probe_is_quarantined(reference: dict, workdir: Path,
                                                        corpus: Path) -> None:
    done, s = _run(workdir, corpus, "probe", "--chaos", "fail-probe@23")
    assert done.returncode == 0, done.stderr[-3000:]
    assert s["state_hash"] == reference["state_hash"]
    [failure] = s["failures"]
    assert failure["kind"] == "fail-probe" and failure["lost_steps"] == 0
    fired = open_store(str(workdir / "store")).read_json("probe", "chaos/fail-probe@23")
    later = [a for a in _attempts(workdir / "store", "probe")
             if a["started_unix"] > fired["fired_unix"]]
    assert later and all(a["worker"] != fired["worker"] for a in later)  # quarantined for good


def test_workers_killed_back_to_back_still_recover(reference: dict, workdir: Path,
                                                   corpus: Path) -> None:
    # The second kill lands while the first victim's replacement is still starting: for a
    # moment no worker runs, and Dask strands a task pinned to the dead worker in 'no-worker'
    # even though its pin is loose. The supervisor resubmits it unpinned.
    done, s = _run(workdir, corpus, "back-to-back", "--chaos", "kill-worker@13,kill-worker@16")
    assert done.returncode == 0, done.stderr[-3000:]
    assert s["state_hash"] == reference["state_hash"]
    kills = [f for f in s["failures"] if f["kind"] == "kill-worker"]
    assert [f["step"] for f in kills] == [13, 16]
    assert all(f["lost_steps"] <= CKPT for f in kills)
