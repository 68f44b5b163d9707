"""The run summary tells the truth (DESIGN.md section 4, issue 7): on a failed epoch attempt, a
worker killed from outside, a resume, and in where the wall time went. Real CLI runs on real
clusters; failures injected for real."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import struct
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from storage import open_store
from tests.cli_helpers import (
    CKPT,
    STEPS,
    cli_args,
    committed_steps,
    kill_group,
    read_summary,
    run_cli,
    start_cli,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("summary")


def _run(workdir: Path, corpus: Path, run_id: str, *extra: str) -> tuple[Any, dict[str, Any]]:
    path = workdir / f"{run_id}.json"
    done = run_cli(cli_args(workdir / "store", corpus, run_id, *extra, "--summary-json", str(path)))
    return done, read_summary(path)


def test_wall_breakdown_adds_up_on_a_real_run(reference: dict) -> None:
    parts = reference["wall_breakdown"]
    assert set(parts) == {"startup_s", "train_s", "eval_s", "checkpoint_stall_s",
                          "orchestration_s", "recovery_s", "lost_s"}
    assert all(v >= 0 for v in parts.values()), parts
    assert abs(sum(parts.values()) - reference["wall_s"]) <= 0.01 * reference["wall_s"] + 0.02
    assert parts["train_s"] == pytest.approx(reference["productive_s"], abs=0.002)
    assert parts["checkpoint_stall_s"] == pytest.approx(reference["checkpoint_stall_s"], abs=0.002)
    # A real run spends real time in each phase it has (no failure: nothing lost or recovered).
    assert parts["startup_s"] > 0 and parts["eval_s"] > 0 and parts["train_s"] > 0
    assert parts["recovery_s"] == 0 and parts["lost_s"] < 0.05


def test_a_failed_epoch_attempt_keeps_its_checkpoints_and_failures(reference: dict, workdir: Path,
                                                                  corpus: Path) -> None:
    # No task retries: the group's failure fails the epoch subflow, which Prefect retries. The
    # failed attempt's commits (5, 10, 15) must still be counted, its losses kept.
    done, s = _run(workdir, corpus, "epoch-retry", "--chaos", "raise@17", "--retries", "0")
    assert done.returncode == 0, done.stderr[-3000:]
    assert s["state_hash"] == reference["state_hash"]
    assert s["checkpoints_committed"] == STEPS // CKPT == len(committed_steps(
        workdir / "store", "epoch-retry"))
    assert [f["kind"] for f in s["failures"]] == ["raise"]
    assert s["failures"][0]["lost_steps"] == 1 and s["failures"][0]["restored_from"] == "checkpoint"
    parts = s["wall_breakdown"]
    assert parts["recovery_s"] > 0 and parts["lost_s"] > 0
    assert abs(sum(parts.values()) - s["wall_s"]) <= 0.01 * s["wall_s"] + 0.02


def test_worker_killed_from_outside_detection_is_measured(prefect_api: str, workdir: Path,
                                                         corpus: Path) -> None:
    store = workdir / "store"
    path = workdir / "outside.json"
    # Long groups (100 steps, ~4 s) so the kill lands mid-group.
    proc = start_cli(cli_args(store, corpus, "outside", "--steps", "300", "--epoch-steps", "300",
                              "--group-steps", "100", "--ckpt-every", "50",
                              "--summary-json", str(path)))
    try:
        while not committed_steps(store, "outside"):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)  # polling the store: the event is a directory appearing on disk
        running = max((doc for _, doc in open_store(str(store)).list_json("outside", "attempts")),
                      key=lambda d: d["started_unix"])
        # Local workers fork from the CLI's forkserver (flows/worker_forkserver.py), which
        # imported torch and Prefect once; the replacement forks from it too.
        server = psutil.Process(running["pid"]).parent()
        assert "forkserver" in " ".join(server.cmdline()) and server.ppid() == proc.pid
        killed_at = time.time()
        os.kill(running["pid"], signal.SIGKILL)  # the worker process, not by any chaos hook
        _, err = proc.communicate(timeout=240)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, err[-3000:]
    s = read_summary(path)
    [lost] = [f for f in s["failures"] if f["kind"] == "worker-lost"]
    assert lost["worker"] == running["worker"]
    # Death is dated by the worker's last sign of life (a step before the kill at most), and
    # detection ends when the flow heard of it: measured, not 0 by construction.
    assert 0 <= killed_at - lost["at_unix"] < 1.0
    assert 0 < lost["detected_after_s"] <= lost["recovered_after_s"]
    assert lost["detected_after_s"] < 5.0
    # It died training the step after the last one it reported, inside its group; the steps it
    # had done since the checkpoint its replacement resumed from are counted as lost.
    assert running["first_step"] < lost["step"] <= running["last_step"]
    assert lost["restored_from"] == "checkpoint" and 0 <= lost["lost_steps"] < lost["step"]


class _OpenWatch:
    """Counts file opens under a folder through the kernel (inotify IN_OPEN): what the
    processes of a run really read, whoever they are."""

    IN_OPEN, IN_ISDIR = 0x20, 0x40000000

    def __init__(self, root: Path) -> None:
        self._libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK)
        assert self.fd >= 0, os.strerror(ctypes.get_errno())
        self.folders: dict[int, Path] = {}
        for folder in [root, *(p for p in root.rglob("*") if p.is_dir())]:
            wd = self._libc.inotify_add_watch(self.fd, str(folder).encode(), self.IN_OPEN)
            assert wd >= 0, os.strerror(ctypes.get_errno())
            self.folders[wd] = folder

    def opened_files(self) -> list[Path]:
        out: list[Path] = []
        while True:
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return out
            i = 0
            while i < len(buf):
                wd, mask, _, length = struct.unpack_from("iIII", buf, i)
                name = buf[i + 16:i + 16 + length].rstrip(b"\0").decode()
                i += 16 + length
                if name and not mask & self.IN_ISDIR:
                    out.append(self.folders[wd] / name)

    def close(self) -> None:
        os.close(self.fd)


def test_resume_reads_each_chunk_once(prefect_api: str, workdir: Path, corpus: Path) -> None:
    store = workdir / "store"
    done, _ = _run(workdir, corpus, "read-once", "--until", "15")
    assert done.returncode == 0, done.stderr[-3000:]
    step_dir = store / "read-once" / "ckpt" / f"{15:012d}"
    chunks = sorted(p for p in step_dir.rglob("*")
                    if p.is_file() and "c" in p.relative_to(step_dir).parts[:-1])
    assert chunks
    watch = _OpenWatch(step_dir)
    try:
        done, s = _run(workdir, corpus, "read-once", "--until", "20")
        opened = [p for p in watch.opened_files() if p in set(chunks)]
    finally:
        watch.close()
    assert done.returncode == 0, done.stderr[-3000:]
    assert s["resumed_from_step"] == 15
    # The task's verified load hashes every chunk; the flow's choice of checkpoint reads none.
    assert sorted(opened) == chunks
