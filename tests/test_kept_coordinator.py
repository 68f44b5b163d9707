"""The coordinator kept warm between runs (flows/kept_coordinator.py,
flows/coordinator_server.py): real servers, real CLI runs; every server a test starts is
stopped by its PID, also on failure."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from flows.kept_api import pid_alive
from flows.kept_coordinator import (
    LOG,
    RECORD,
    _wait_for_start,
    read_record,
    stop_kept_coordinator,
)
from tests.cli_helpers import (
    ROOT,
    cli_args,
    kill_group,
    our_processes_since,
    pids_now,
    read_summary,
    start_cli,
)
from tests.test_kept_api import _await_exit

pytestmark = pytest.mark.slow

@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    """A REBOUND_HOME whose kept coordinators are all stopped at the end, by PID."""
    folder = tmp_path / "rebound-home"
    try:
        yield folder
    finally:
        stop_kept_coordinator(folder)
        for pid in _servers_of(folder):  # those that lost the record to another key
            os.kill(pid, signal.SIGTERM)
            assert _await_exit(pid, 60)


def _servers_of(home: Path) -> list[int]:
    """The PIDs of the kept coordinators started for `home` that still run."""
    pids = []
    for pid in pids_now():
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"flows.coordinator_server" in argv and str(home / RECORD).encode() in argv:
                pids.append(int(pid))
    return pids


def _env(home: Path, **extra: str) -> dict[str, str]:
    return {**os.environ, "REBOUND_HOME": str(home), "REBOUND_COORDINATOR_IDLE": "10m", **extra}


def _handed_over(home: Path) -> dict[int, int]:
    """Command PID -> the PID of the coordinator the kept server forked for it."""
    text = (home / LOG).read_text() if (home / LOG).exists() else ""
    return {int(m[1]): int(m[2]) for m in re.finditer(r"command (\d+): coordinator (\d+)", text)}


def _start_server(home: Path, **extra: str) -> int:
    """Start the kept coordinator as a run's end does, for the environment of _env(home)."""
    done = subprocess.run([sys.executable, "-m", "tests.kept_coordinator_starter"], cwd=ROOT,
                          env=_env(home, **extra), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-3000:]
    pid = json.loads(done.stdout)["pid"]
    assert pid is not None
    return int(pid)


def _run(args: list[str], env: dict[str, str]) -> tuple[subprocess.CompletedProcess, int]:
    proc = start_cli(args, env=env)
    try:
        out, err = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), proc.pid


def test_a_second_run_is_handed_to_the_kept_coordinator_and_ends_as_its_own_would(
        home: Path, tmp_path: Path, corpus: Path, reference: dict[str, Any]) -> None:
    env = _env(home)
    summaries = []
    for n in (1, 2):
        summary = tmp_path / f"summary{n}.json"
        done, pid = _run(cli_args(tmp_path / f"store{n}", corpus, f"kc{n}", "--summary-json",
                                  str(summary)), env)
        assert done.returncode == 0, done.stderr[-3000:]
        summaries.append(read_summary(summary))
        notes = [line for line in done.stderr.splitlines() if "REBOUND_COORDINATOR_IDLE" in line]
        if n == 1:  # ran by itself, then kept a coordinator for the next run
            assert pid not in _handed_over(home)
            assert len(notes) == 1
            _wait_for_start(home)  # it imports after the run: the next command waits so
            assert f"(pid {read_record(home)['pid']})" in notes[0]
        else:  # handed over: its coordinator was forked by the kept server
            assert pid in _handed_over(home) and not notes
    for summary in summaries:
        assert summary["status"] == "completed"
        assert summary["state_hash"] == reference["state_hash"]
    server = int(read_record(home)["pid"])
    # Bad usage through the kept coordinator: exit 2, one line, from the coordinator.
    done, pid = _run(["--steps", "-3", "--store", str(tmp_path / "bad")], env)
    assert done.returncode == 2
    assert [line for line in done.stderr.splitlines() if line.strip()] == [
        done.stderr.strip()] and done.stderr.startswith("error: ")
    assert pid in _handed_over(home) and not (tmp_path / "bad").exists()
    # Another environment: its run goes by itself and keeps a coordinator of its own.
    done, pid = _run(cli_args(tmp_path / "store3", corpus, "kc3"), _env(home, OTHER_VAR="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert pid not in _handed_over(home)
    _wait_for_start(home)
    assert int(read_record(home)["pid"]) != server  # the old one leaves after its idle window
    assert server in _servers_of(home)


def _until_line(proc: subprocess.Popen, needle: str) -> list[str]:
    """The command's stderr lines up to the first holding `needle` (the coordinator's print)."""
    lines = []
    for line in proc.stderr:  # type: ignore[union-attr]
        lines.append(line)
        if needle in line:
            return lines
    raise AssertionError(f"the run ended before {needle!r}: {''.join(lines)[-3000:]}")


@pytest.mark.parametrize("how", ["sigkill", "sigint"])
def test_the_handed_over_coordinator_dies_with_its_command_and_hears_its_signals(
        home: Path, tmp_path: Path, corpus: Path, prefect_api: str, how: str) -> None:
    server = _start_server(home)
    before = pids_now()
    args = cli_args(tmp_path / "store", corpus, "kc", "--steps", "400", "--group-steps", "100")
    proc = start_cli(args, env=_env(home))
    try:
        _until_line(proc, "Dask dashboard")
        coordinator = _handed_over(home)[proc.pid]
        assert pid_alive(coordinator)
        if how == "sigkill":
            proc.kill()
            assert proc.wait(timeout=30) == -signal.SIGKILL
            assert _await_exit(coordinator, 10), "the coordinator outlived its command"
        else:  # Ctrl-C: the run stops as its own process would, with its summary
            proc.send_signal(signal.SIGINT)
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 1, err[-3000:]
            assert "failed: interrupted" in err
            assert _await_exit(coordinator, 10)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    # Nothing of the run outlives it: its cluster's processes went with its coordinator.
    for pid in our_processes_since(before):
        assert _await_exit(int(pid), 30), Path(f"/proc/{pid}/cmdline").read_bytes()
    assert pid_alive(server)  # and serves the next run
    done, pid = _run(cli_args(tmp_path / "store2", corpus, "kc2"), _env(home))
    assert done.returncode == 0, done.stderr[-3000:]
    assert pid in _handed_over(home)


def test_a_bad_idle_setting_is_one_line_and_starts_nothing(home: Path, tmp_path: Path,
                                                           prefect_api: str) -> None:
    done, _ = _run(["--store", str(tmp_path / "store")],
                   _env(home, REBOUND_COORDINATOR_IDLE="later"))
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: REBOUND_COORDINATOR_IDLE='later' is not a duration such as 10m, 90s or 0 "
        "(0: nothing kept between runs)"]
    assert not (tmp_path / "store").exists() and not home.exists()


def test_the_server_leaves_once_idle_and_takes_its_record_along(home: Path,
                                                                prefect_api: str) -> None:
    server = _start_server(home, REBOUND_COORDINATOR_IDLE="2s")
    assert _await_exit(server, 60)  # imports (~3 s), then 2 s without a run
    assert not (home / RECORD).exists()


def test_a_stopped_server_is_put_down_and_the_run_goes_on_by_itself(
        home: Path, tmp_path: Path, corpus: Path, prefect_api: str) -> None:
    server = _start_server(home)
    _wait_for_start(home)
    os.kill(server, signal.SIGSTOP)  # alive, and answering nobody
    try:
        done, pid = _run(cli_args(tmp_path / "store", corpus, "kc"), _env(home))
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server, signal.SIGCONT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert pid not in _handed_over(home)
    assert _await_exit(server, 10)  # put down by the command, by its PID
    _wait_for_start(home)
    assert int(read_record(home)["pid"]) != server  # the run kept a new one
