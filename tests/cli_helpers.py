"""Run `python -m flows.train` as a user would: a real subprocess, stopped by PID on any exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 240.0

# The tests' run: tiny preset (epochs of 20 steps), groups of 10, a checkpoint every 5 steps.
STEPS, GROUP, CKPT = 40, 10, 5


def cli_args(store: Path, corpus: Path, run_id: str, *extra: str) -> list[str]:
    """The flags of the tests' run; extra flags come last (argparse: the last one wins)."""
    return ["--model", "tiny", "--steps", str(STEPS), "--group-steps", str(GROUP),
            "--ckpt-every", str(CKPT), "--store", str(store), "--data", str(corpus),
            "--run-id", run_id, "--threads", "1",  # default: 1 worker + 1 spare
            "--keep", "20", *extra]


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the CLI and everything it started (its own process group), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def start_cli(args: list[str], **popen: Any) -> subprocess.Popen:
    """Start the CLI in its own session so that it and its Dask workers can be killed together."""
    return subprocess.Popen(
        [sys.executable, "-m", "flows.train", "--no-progress", *args],
        cwd=ROOT,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def run_cli(args: list[str], timeout_s: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
    """Run the CLI to its end; its process group is killed if it outlives timeout_s."""
    proc = start_cli(args)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        kill_group(proc)
        out, err = proc.communicate()
        raise AssertionError(f"CLI ran past {timeout_s}s: {args}\n{err[-3000:]}") from None
    finally:
        if proc.poll() is None:
            kill_group(proc)
        else:
            # Workers of a finished CLI are gone with their nannies; make sure nothing lingers.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def kill_when(proc: subprocess.Popen, condition: Any, timeout_s: float = RUN_TIMEOUT_S) -> None:
    """SIGKILL the CLI's whole process group as soon as condition() holds."""
    deadline = time.monotonic() + timeout_s
    try:
        while not condition():
            if proc.poll() is not None:
                raise AssertionError(
                    f"CLI ended (rc {proc.returncode}) before the kill point:\n"
                    f"{proc.stderr.read()[-3000:] if proc.stderr else ''}"
                )
            if time.monotonic() > deadline:
                raise AssertionError("kill point never reached")
            time.sleep(0.05)  # polling the store: the event is a directory appearing on disk
    finally:
        kill_group(proc)


def committed_steps(store: Path, run_id: str) -> list[int]:
    ckpt = store / run_id / "ckpt"
    if not ckpt.is_dir():
        return []
    return sorted(
        int(p.name) for p in ckpt.iterdir() if p.name.isdigit() and (p / "COMMITTED").exists()
    )


def read_summary(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def background_commits(store: Path, run_id: str) -> list[int]:
    """Steps committed from a background save thread, from the attempts' records."""
    from storage import open_store

    return sorted(step for _, doc in open_store(str(store)).list_json(run_id, "attempts")
                  for step in doc.get("background_checkpoints", []))


def verify_store(store: Path, run_id: str) -> subprocess.CompletedProcess:
    """`python -m storage verify STORE RUN`: every kept checkpoint read back and checked."""
    return subprocess.run([sys.executable, "-m", "storage", "verify", str(store), run_id],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime: to show that nothing was touched."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def pids_now() -> set[str]:
    return {p for p in os.listdir("/proc") if p.isdigit()}


def our_processes_since(before: set[str]) -> list[str]:
    """PIDs of Rebound's own processes (`python -m flows.*`) that did not exist in `before`."""
    left = []
    for pid in pids_now() - before:
        try:
            if b"flows." in Path(f"/proc/{pid}/cmdline").read_bytes():
                left.append(pid)
        except OSError:
            continue  # gone meanwhile
    return left
