"""The local Prefect API kept between runs (flows/kept_api.py, flows/api_server.py): real
servers, real runs, real SIGKILLs; every server a test starts is stopped by its PID."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from flows.kept_api import LOG, RECORD, read_record, stop_kept_server, terminate
from tests.cli_helpers import ROOT, cli_args, kill_group, read_summary, start_cli

pytestmark = pytest.mark.slow


def _env(home: Path, idle: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(REBOUND_HOME=str(home), REBOUND_API_IDLE=idle,
               PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "rebound-home"
    try:
        yield folder
    finally:
        stop_kept_server(folder / "prefect")


class Client:
    """tests/kept_api_client.py: uses the API until released."""

    def __init__(self, home: Path, idle: str, **env: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.kept_api_client"], cwd=ROOT,
            env={**_env(home, idle), **env}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, start_new_session=True)

    def got(self) -> dict:
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        assert line, self.proc.stderr.read()[-3000:]  # type: ignore[union-attr]
        return json.loads(line)

    def release(self) -> str:
        _, err = self.proc.communicate(timeout=60)
        assert self.proc.returncode == 0, err[-3000:]
        return err

    def kill(self) -> None:
        if self.proc.poll() is None:
            kill_group(self.proc)


def _await_exit(pid: int, timeout_s: float) -> bool:
    """Whether the process `pid` (not our child) exited within timeout_s: an event, not a poll."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return True
    try:
        return bool(select.select([fd], [], [], timeout_s)[0])
    finally:
        os.close(fd)


def test_runs_share_one_kept_api_which_leaves_once_idle(home: Path, tmp_path: Path,
                                                        corpus: Path) -> None:
    summaries = []
    for n in (1, 2):
        args = cli_args(tmp_path / "store", corpus, f"kept{n}", "--steps", "6", "--spares", "0",
                        "--summary-json", str(tmp_path / f"s{n}.json"))
        proc = start_cli(args, env=_env(home, "20s"))
        try:
            _, err = proc.communicate(timeout=240)
        finally:
            kill_group(proc)  # the run's own process group: the kept server is not in it
        assert proc.returncode == 0, err[-3000:]
        summaries.append((read_summary(tmp_path / f"s{n}.json"), err))
        record = read_record(home / "prefect")
        assert record is not None, f"no live kept server after run {n}"
        if n == 1:
            first_pid = record["pid"]
            assert f"pid {first_pid}) stays up for later runs" in err
        else:
            assert record["pid"] == first_pid, "the second run started a server of its own"
            assert "stays up" not in err
    assert [s["status"] for s, _ in summaries] == ["completed", "completed"]
    # Nobody uses it now: it goes by itself after its idle window, withdrawing its record.
    left_at = time.monotonic()
    assert _await_exit(first_pid, 120), "the kept server outlived its idle window"
    assert time.monotonic() - left_at > 5, "it left long before its 20 s idle window"
    assert not (home / "prefect" / RECORD).exists()


def test_a_server_never_leaves_under_a_run_and_a_dead_one_is_replaced(home: Path) -> None:
    holder = Client(home, "1s")
    try:
        first = holder.got()
        assert first["kept"] and first["started_here"]
        # An idle window of 1 s, five times over: the holder keeps it up.
        assert not _await_exit(first["pid"], 5), "the server left while a run held it"
        second = Client(home, "1s")
        try:
            assert second.got() == {**first, "started_here": False}
        finally:
            second.release()
    finally:
        holder.release()
    assert _await_exit(first["pid"], 60), "the server stayed after its last user left"
    # A server killed outright leaves a record naming a dead PID: the next user starts anew.
    third = Client(home, "10m")
    try:
        killed = third.got()
        os.kill(killed["pid"], signal.SIGKILL)
        assert _await_exit(killed["pid"], 30)
    finally:
        third.release()
    assert json.loads((home / "prefect" / RECORD).read_text())["pid"] == killed["pid"]
    fourth = Client(home, "10m")
    try:
        fresh = fourth.got()
        assert fresh["started_here"] and fresh["pid"] != killed["pid"]
    finally:
        err = fourth.release()
    assert f"names pid {killed['pid']}, which has exited" in err


def test_two_runs_at_once_start_one_server_and_other_settings_get_their_own(
        home: Path) -> None:
    pair = [Client(home, "10m"), Client(home, "10m")]
    try:
        got = [c.got() for c in pair]
        if got[0]["pid"] != got[1]["pid"]:
            errs = [c.release() for c in pair]
            pair = []
            for server in {g["pid"] for g in got}:  # the fixture stops only the recorded one
                terminate(server, 30)
            log = (home / "prefect" / LOG).read_text(errors="replace")[-2000:]
            pytest.fail(f"two servers started: {got}\nstderr: {errs}\nserver log: {log}")
        assert sorted(g["started_here"] for g in got) == [False, True]
        # Other server settings: the kept server is not theirs; a server of its own instead.
        other = Client(home, "10m", PREFECT_SERVER_API_DEFAULT_LIMIT="150")
        try:
            own = other.got()
            assert not own["kept"] and own["port"] != got[0]["port"]
        finally:
            err = other.release()
        assert "runs another Prefect version or settings" in err
    finally:
        for c in pair:
            c.release()
    assert read_record(home / "prefect")["pid"] == got[0]["pid"]  # type: ignore[index]


def test_a_bad_idle_setting_is_refused_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "flows.train", "--model", "tiny"], cwd=ROOT,
                          env=_env(tmp_path / "home", "soon"), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: REBOUND_API_IDLE='soon' is not a duration such as 10m, 90s or 0 "
        "(0: nothing kept between runs)"]
    assert not (tmp_path / "home" / "prefect" / RECORD).exists()


def test_help_and_bad_usage_start_no_server(tmp_path: Path) -> None:
    home = tmp_path / "home"
    for argv in (["--help"], ["--lease-ttl", "soon"]):
        done = subprocess.run([sys.executable, "-m", "flows.train", *argv], cwd=ROOT,
                              env=_env(home, "10m"), capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == (0 if argv == ["--help"] else 2), done.stderr[-3000:]
        assert not (home / "prefect" / RECORD).exists(), f"{argv} started a kept API"
