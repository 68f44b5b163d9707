"""The local Dask cluster kept between runs (flows/kept_cluster.py, flows/cluster_server.py):
real servers, real runs; every server a test starts is stopped by its PID, also on failure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from distributed import Client

from flows.kept_api import pid_alive
from flows.kept_cluster import (
    RECORD,
    KeptClusterManager,
    cluster_key,
    read_record,
    scheduler_answers,
    stop_kept_cluster,
)
from tests.cli_helpers import (
    ROOT,
    cli_args,
    committed_steps,
    kill_group,
    our_processes_since,
    pids_now,
    read_summary,
    run_cli,
    start_cli,
)
from tests.test_kept_api import _await_exit

pytestmark = pytest.mark.slow


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A REBOUND_HOME whose kept clusters are all stopped at the end, by PID."""
    folder = tmp_path / "rebound-home"
    started: list[int] = []
    try:
        yield folder
    finally:
        record = read_record(folder)
        if record is not None:
            started.append(int(record["pid"]))
        stop_kept_cluster(folder)
        for pid in started:
            assert _await_exit(pid, 60)


def _workers(address: str) -> dict[str, int]:
    """Worker address -> PID of its process."""
    with Client(address, timeout=30, set_as_default=False) as client:
        return dict(client.run(os.getpid))


def test_runs_share_one_kept_cluster_bit_exact_and_it_replaces_a_worker_on_request(
        home: Path, tmp_path: Path, corpus: Path, prefect_api: str,
        reference: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REBOUND_HOME", str(home))
    monkeypatch.setenv("REBOUND_CLUSTER_IDLE", "2m")
    summaries, notes = [], []
    for n in (1, 2):
        path = tmp_path / f"summary{n}.json"
        done = run_cli(cli_args(tmp_path / f"store{n}", corpus, "reference", "--summary-json",
                                str(path)))
        assert done.returncode == 0, done.stderr[-3000:]
        summaries.append(read_summary(path))
        notes.append([line for line in done.stderr.splitlines()
                      if line.startswith("note: the Dask cluster")])
        if n == 1:
            record = read_record(home)
            assert record is not None, "the first run left no kept cluster"
            workers = _workers(record["address"])
    # The first run says that the cluster stays, and how to turn it off; the second reuses it.
    assert len(notes[0]) == 1 and record["address"] in notes[0][0] and \
        "REBOUND_CLUSTER_IDLE" in notes[0][0]
    assert notes[1] == []
    assert read_record(home) == record
    # The second run trained on the same worker processes: it started none.
    assert _workers(record["address"]) == workers
    for summary in summaries:
        assert summary["status"] == "completed"
        assert set(summary["redundancy"]["roles"]) | set(summary["redundancy"]["spares"]) == \
            set(workers)
        # Bit-exact with the same run on a cluster of its own (REBOUND_CLUSTER_IDLE=0).
        assert summary["state_hash"] == reference["state_hash"]

    # A quarantine's replacement, asked through the proxy the run registers as the manager.
    spare = summaries[1]["redundancy"]["spares"][0]
    said: list[str] = []
    KeptClusterManager(record["address"]).rescale(spare, len(workers), "replacement-1",
                                                   said.append)
    assert said == []
    deadline = time.monotonic() + 120
    now = _workers(record["address"])
    while spare in now or len(now) < len(workers):
        assert time.monotonic() < deadline, f"no replacement for {spare}: {now}"
        time.sleep(0.2)  # polling: the join is an event of the server's scheduler
        now = _workers(record["address"])
    assert len(now) == len(workers) and spare not in now

    # SIGTERM closes the workers with the server, and its record goes.
    pid = stop_kept_cluster(home)
    assert pid == record["pid"] and not (home / RECORD).exists()
    assert not any(pid_alive(p) for p in now.values())


IDLE_S = 15.0
"""Long enough for the next claim to arrive before an unused cluster leaves."""


CLAIM = """
import json, pathlib, sys
from flows.kept_cluster import claim
k = claim(pathlib.Path(sys.argv[1]), 1, False, float(sys.argv[2]))
a = None if k is None else k.wait_address()
print(json.dumps(None if k is None else {'address': a, 'pid': k.pid, 'key': k.key,
                                         'started_here': k.started_here,
                                         'note': None if a else k.failed_note()}))
sys.stdout.flush()
sys.stdin.read()  # holds the cluster until told to go
"""


def _claimant(home: Path, **env: str) -> subprocess.Popen:
    """A process that claims the kept cluster of one worker, says what it got (one JSON line)
    and holds it until its stdin closes."""
    return subprocess.Popen([sys.executable, "-c", CLAIM, str(home), str(IDLE_S)], cwd=ROOT,
                            env={**os.environ, **env}, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _got(proc: subprocess.Popen) -> dict[str, Any] | None:
    line = proc.stdout.readline()  # type: ignore[union-attr]
    assert line, proc.stderr.read()[-3000:]  # type: ignore[union-attr]
    return json.loads(line)


def _release(proc: subprocess.Popen) -> None:
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]


def _claim(home: Path, **env: str) -> dict[str, Any] | None:
    """Claim, say what was got, and exit at once."""
    proc = _claimant(home, **env)
    try:
        return _got(proc)
    finally:
        _release(proc)


def test_one_run_at_a_time_another_environment_gets_its_own_and_an_idle_one_leaves(
        home: Path) -> None:
    holder = _claimant(home)
    try:
        first = _got(holder)
        assert first is not None and first["started_here"]
        # While a run trains on it, another run of the same key gets none (its own cluster).
        assert _claim(home) is None
    finally:
        _release(holder)
    again = _claim(home)
    assert first is not None and again is not None and not again["started_here"]
    assert (again["pid"], again["address"]) == (first["pid"], first["address"])
    # Workers inherit the environment: another one is another cluster, which takes the record.
    other = _claim(home, REBOUND_TEST_SETTING="1")
    assert other is not None and other["started_here"] and other["pid"] != first["pid"]
    assert other["key"] != first["key"]
    assert read_record(home)["pid"] == other["pid"]  # type: ignore[index]
    # Nobody uses either now: both leave after their idle window, the record with its owner.
    assert _await_exit(first["pid"], 90) and _await_exit(other["pid"], 90)
    assert not (home / RECORD).exists()


def test_a_stopped_kept_cluster_is_put_down_and_the_next_run_starts_its_own(home: Path) -> None:
    first = _claim(home)
    assert first is not None and first["started_here"]
    os.kill(first["pid"], signal.SIGSTOP)
    try:
        # Reused, it would hang the run at its first call to the scheduler.
        again = _claim(home)
        assert again is not None and again["started_here"] and again["pid"] != first["pid"]
        assert not pid_alive(first["pid"])
        assert read_record(home)["pid"] == again["pid"]  # type: ignore[index]
    finally:
        if pid_alive(first["pid"]):
            os.kill(first["pid"], signal.SIGKILL)


WEDGE = """
import sys, time
from distributed import Client
with Client(sys.argv[1], timeout=30, set_as_default=False) as client:
    client.run_on_scheduler(time.sleep, 3600)  # runs in the scheduler's event loop
"""


def test_a_wedged_kept_cluster_is_put_down_within_its_answer_timeout(home: Path) -> None:
    first = _claim(home)
    assert first is not None and first["started_here"]
    # Its process lives and is not stopped, but its scheduler's event loop serves nobody.
    wedge = subprocess.Popen([sys.executable, "-c", WEDGE, first["address"]], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while scheduler_answers(first["address"], 1.0):  # each look waits up to 1 s itself
            assert time.monotonic() < deadline and wedge.poll() is None, "no wedge"
            time.sleep(0.1)  # polling: the wedge's arrival at the scheduler sends no event
        found = _claim(home)
        assert found is not None and not found["started_here"]
        assert found["pid"] == first["pid"] and found["address"] is None
        assert found["note"] == (
            f"note: the Dask cluster kept between runs (pid {first['pid']}) answered nothing "
            "for 10 s and is put down; this run starts a cluster of its own")
        assert not pid_alive(first["pid"]) and read_record(home) is None
        again = _claim(home)  # the next run starts the one that takes its place
        assert again is not None and again["started_here"] and again["address"]
    finally:
        wedge.kill()
        wedge.wait()
        if pid_alive(first["pid"]):
            os.kill(first["pid"], signal.SIGKILL)


def test_the_key_follows_our_code(tmp_path: Path) -> None:
    before = cluster_key(2, False)
    assert cluster_key(2, False) == before
    assert cluster_key(3, False) != before and cluster_key(2, True) != before
    module = ROOT / "flows" / "kept_cluster.py"
    st = module.stat()
    try:
        os.utime(module, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        assert cluster_key(2, False) != before  # an edited file never runs with the old code
    finally:
        os.utime(module, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cluster_key(2, False) == before


def test_a_bad_idle_setting_is_one_line_and_starts_nothing(tmp_path: Path, corpus: Path) -> None:
    home = tmp_path / "home"
    env = {**os.environ, "REBOUND_HOME": str(home), "REBOUND_CLUSTER_IDLE": "later"}
    done = subprocess.run(
        [sys.executable, "-m", "flows.train", "--no-progress",
         *cli_args(tmp_path / "store", corpus, "bad")], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: REBOUND_CLUSTER_IDLE='later' is not a duration such as 10m, 90s or 0 "
        "(0: nothing kept between runs)"]
    assert not (home / RECORD).exists() and not (tmp_path / "store").exists()


def _server_of(home: Path) -> int | None:
    """PID of the kept-cluster server started for `home`, once it exists."""
    for pid in pids_now():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # gone meanwhile
        if b"flows.cluster_server" in argv and str(home / RECORD).encode() in argv:
            return int(pid)
    return None


def test_a_kept_cluster_killed_while_it_starts_costs_the_run_nothing(
        home: Path, tmp_path: Path, corpus: Path, prefect_api: str,
        reference: dict[str, Any]) -> None:
    before = pids_now()
    summary_path = tmp_path / "summary.json"
    env = {**os.environ, "REBOUND_HOME": str(home), "REBOUND_CLUSTER_IDLE": "2m"}
    proc = start_cli(cli_args(tmp_path / "store", corpus, "reference", "--summary-json",
                              str(summary_path)), env=env)
    try:
        deadline = time.monotonic() + 60
        while (server := _server_of(home)) is None:
            assert proc.poll() is None, proc.stderr.read()[-3000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the run started no kept cluster"
            time.sleep(0.02)  # polling /proc: the server's start is not an event we can await
        # Its imports take seconds: it dies long before its workers are up (the OOM killer's way).
        os.kill(server, signal.SIGKILL)
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert proc.returncode == 0, err[-3000:]
    assert [line for line in err.splitlines() if "did not start" in line] == [
        f"note: the Dask cluster kept between runs did not start (see {home / 'cluster.log'}); "
        "this run starts a cluster of its own"]
    assert not any(line.startswith("note: the Dask cluster at") for line in err.splitlines())
    summary = read_summary(summary_path)
    assert summary["status"] == "completed"
    assert summary["state_hash"] == reference["state_hash"]
    assert read_record(home) is None and not pid_alive(server)
    # Nothing of the dead server's, nor of the run's own cluster, outlives the run.
    deadline = time.monotonic() + 30
    while (left := our_processes_since(before)):
        assert time.monotonic() < deadline, f"left running: {left}"
        time.sleep(0.1)  # polling /proc: orphans are not our children to wait for


@pytest.mark.parametrize(("blow", "said", "known_within_s"), [
    ("killed", "was lost (cluster lost)", 10),
    # Alive, serving nobody: without bounded looks of its own, the run would wait forever. A
    # look in flight when it stops runs out its 10 s first.
    ("stopped", "was stopped by a signal and is put down (cluster lost)", 40),
], ids=["killed", "stopped"])
def test_a_kept_cluster_lost_mid_run_heals_on_a_cluster_of_the_runs_own(
        home: Path, tmp_path: Path, corpus: Path, prefect_api: str,
        reference: dict[str, Any], blow: str, said: str, known_within_s: float) -> None:
    before = pids_now()
    server: int | None = None
    store, summary_path = tmp_path / "store", tmp_path / "summary.json"
    env = {**os.environ, "REBOUND_HOME": str(home), "REBOUND_CLUSTER_IDLE": "2m"}
    started = time.time()
    proc = start_cli(cli_args(store, corpus, "reference", "--summary-json", str(summary_path)),
                     env=env)
    try:
        deadline = time.monotonic() + 240
        while not any(s >= 10 for s in committed_steps(store, "reference")):
            assert proc.poll() is None, proc.stderr.read()[-3000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "no checkpoint at step 10"
            time.sleep(0.05)  # polling the store: the event is a directory appearing on disk
        record = read_record(home)
        assert record is not None
        server = int(record["pid"])
        # The server holds the scheduler and the workers' nannies: the whole cluster goes.
        os.kill(server, signal.SIGKILL if blow == "killed" else signal.SIGSTOP)
        lost_at = time.time()
        _, err = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            kill_group(proc)
        if server is not None and pid_alive(server):
            os.kill(server, signal.SIGKILL)  # a stopped server the run failed to put down
    assert proc.returncode == 0, err[-3000:]
    assert len([line for line in err.splitlines() if said in line]) == 1, err[-3000:]
    assert not pid_alive(server)  # a stopped one too: it would hang the next run
    summary = read_summary(summary_path)
    assert summary["status"] == "completed" and summary["final_step"] == 40
    assert summary["state_hash"] == reference["state_hash"]
    [lost] = [f for f in summary["failures"] if f["kind"] == "cluster-lost"]
    # Known from the server's PID, not after --cluster-timeout (30 s) of silence.
    assert lost["at_unix"] - lost_at < known_within_s and lost["recovered_after_s"] is not None
    assert summary["wall_s"] > lost_at - started  # one wall clock for both parts
    assert sorted(committed_steps(store, "reference")) == [5, 10, 15, 20, 25, 30, 35, 40]
    # No note that a dead cluster stays; nothing of either cluster outlives the run.
    assert not any(line.startswith("note: the Dask cluster at") for line in err.splitlines())
    assert read_record(home) is None
    deadline = time.monotonic() + 30
    while (left := our_processes_since(before)):
        assert time.monotonic() < deadline, f"left running: {left}"
        time.sleep(0.1)  # polling /proc: orphans are not our children to wait for


def test_the_progress_view_follows_the_run_onto_the_cluster_that_replaced_a_lost_one(
        tmp_path: Path) -> None:
    import io

    from distributed import LocalCluster
    from rich.console import Console

    from flows.progress_view import ProgressView
    from tasks.progress import PROGRESS_TOPIC

    def shown_after_progress_at(address: str, step: int) -> None:
        """A worker's progress event at `step`, sent until the view shows it (the view's
        subscription reaches the scheduler on its own time)."""
        deadline = time.monotonic() + 30
        with Client(address, timeout=30, set_as_default=False) as client:
            while view._progress.tasks[0].completed != step:
                assert time.monotonic() < deadline, view._progress.tasks[0].completed
                client.log_event(PROGRESS_TOPIC, {"run_id": "r", "step": step, "loss": 1.0})
                time.sleep(0.1)  # polling: the event arrives on the view's client thread

    kw = {"n_workers": 0, "processes": True, "host": "127.0.0.1",
          "dashboard_address": "127.0.0.1:0", "local_directory": str(tmp_path)}
    with LocalCluster(**kw) as lost, LocalCluster(**kw) as new, \
            ProgressView(Console(file=io.StringIO()), "r", 40, 0) as view:
        view.attach(lost.scheduler_address)
        shown_after_progress_at(lost.scheduler_address, 12)
        old = view._client
        view.attach(new.scheduler_address)  # what flows.cluster.CLUSTER_LISTENERS calls
        assert old is not None and old.status == "closed"
        shown_after_progress_at(new.scheduler_address, 17)
