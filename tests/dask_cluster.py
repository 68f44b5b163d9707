"""A real Dask cluster from the command-line tools, as an operator would start it.

Every process is started in its own session and stopped by process group (PID), also when a
test fails half-way.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.cli_helpers import kill_group

BIN = Path(sys.executable).parent
START_TIMEOUT_S = 90.0


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=Path(__file__).resolve().parents[1])


kill = kill_group

class CommandLineCluster:
    """`dask scheduler` + `dask worker` processes on 127.0.0.1."""

    def __init__(self, folder: Path, n_workers: int) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.scheduler_file = folder / f"scheduler-{time.monotonic_ns()}.json"
        self.scheduler = _spawn([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1",
                                 "--port", "0", "--dashboard-address", "127.0.0.1:0",
                                 "--scheduler-file", str(self.scheduler_file)],
                                folder / "scheduler.log")
        self.workers: list[subprocess.Popen] = []
        try:
            self.address = self._wait_for_scheduler()
            for _ in range(n_workers):
                self.workers.append(_spawn(
                    [str(BIN / "dask"), "worker", self.address, "--nthreads", "1",
                     "--nworkers", "1", "--host", "127.0.0.1", "--dashboard-address",
                     "127.0.0.1:0", "--preload", "tasks.preload", "--local-directory",
                     str(folder / "scratch")], folder / "workers.log"))
            self._wait_for_workers(n_workers)
        except BaseException:
            self.close()
            raise

    def _wait_for_scheduler(self) -> str:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.scheduler.poll() is not None:
                raise RuntimeError(f"dask scheduler exited: {self.scheduler.returncode}")
            try:
                return str(json.loads(self.scheduler_file.read_text())["address"])
            except (FileNotFoundError, ValueError, KeyError):
                time.sleep(0.1)  # the scheduler writes its file once it listens
        raise RuntimeError("dask scheduler did not start")

    def _wait_for_workers(self, n: int) -> None:
        from distributed import Client

        with Client(self.address, timeout=30, set_as_default=False) as client:
            client.wait_for_workers(n, timeout=START_TIMEOUT_S)

    def kill_scheduler(self) -> None:
        kill(self.scheduler)

    def kill_workers(self) -> None:
        for worker in self.workers:
            kill(worker)

    def close(self) -> None:
        self.kill_workers()
        kill(self.scheduler)
