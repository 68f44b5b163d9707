"""Issue 7 (14): a worker booted without root trains at normal priority.

A real `dask worker` with Rebound's preload runs as the unprivileged user `nobody` (setpriv),
so it cannot raise a priority once lowered; every thread of its worker process, and the thread
that runs a task, must end at nice 0 (read from /proc, not from the worker's own account).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed import Client, LocalCluster

from tests.cli_helpers import ROOT, kill_group

pytestmark = pytest.mark.slow

NOBODY = 65534
SETPRIV = shutil.which("setpriv")


def _nice_of_threads(pid: int) -> dict[int, int]:
    """Thread id -> nice value, from /proc/<pid>/task/<tid>/stat (field 19)."""
    nice: dict[int, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except FileNotFoundError:
            continue  # a thread that just ended
        nice[int(tid)] = int(stat.rsplit(")", 1)[1].split()[16])
    return nice


def _uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1])


def _unprivileged(*argv: str) -> list[str]:
    return [str(SETPRIV), f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *argv]


def _interpreter_for_nobody(env: dict[str, str]) -> str | None:
    """A Python of this version that `nobody` may execute, running this venv's packages (the
    venv's own interpreter can live in a root-only folder, e.g. pyenv under /root)."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (sys.executable, shutil.which(version), f"/usr/bin/{version}"):
        if candidate and subprocess.run(
                # A child of its own too: the nanny starts the worker as one.
                _unprivileged(candidate, "-c", "import subprocess, sys; sys.exit(subprocess.call("
                              "[sys.executable, '-c', 'import torch, distributed, prefect']))"),
                env=env, capture_output=True, timeout=120).returncode == 0:
            return candidate
    return None


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A scratch folder the unprivileged user can write (pytest's tmp_path is root-only)."""
    folder = Path(tempfile.mkdtemp(prefix="rebound-nobody-"))
    folder.chmod(0o777)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0 or SETPRIV is None,
                    reason="needs root and setpriv to start a worker as an unprivileged user")
def test_worker_booted_without_root_trains_at_normal_priority(shared_tmp: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "DASK_"))}
    env.update(HOME=str(shared_tmp), PREFECT_HOME=str(shared_tmp / "prefect"),
               DASK_TEMPORARY_DIRECTORY=str(shared_tmp / "dask"),
               PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PYTHONPATH=os.pathsep.join([sysconfig.get_paths()["purelib"], str(ROOT)]))
    python = _interpreter_for_nobody(env)
    if python is None:
        pytest.skip("no Python interpreter that the user nobody may run")
    with LocalCluster(n_workers=0, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, \
            Client(cluster.scheduler_address, set_as_default=False) as client:
        worker = subprocess.Popen(
            _unprivileged(python, "-m", "distributed.cli.dask_worker", cluster.scheduler_address,
             "--nthreads", "1", "--nworkers", "1", "--host", "127.0.0.1",
             "--dashboard-address", "127.0.0.1:0", "--preload", "tasks.preload",
             "--local-directory", str(shared_tmp / "scratch")),
            cwd=ROOT, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
            stderr=open(shared_tmp / "worker.log", "wb"))  # noqa: SIM115 - closed with the process
        try:
            client.wait_for_workers(1, timeout=120)
            [(address, pid)] = client.run(os.getpid).items()
            assert _uid_of(pid) == NOBODY  # really unprivileged
            # The thread that runs tasks (training) is created after the boot: ask it.
            task_nice = client.submit(os.getpriority, os.PRIO_PROCESS, 0, pure=False,
                                      workers=[address]).result(timeout=60)
            threads = _nice_of_threads(pid)
        finally:
            kill_group(worker)
    assert task_nice == 0
    assert threads and set(threads.values()) == {0}, threads
