"""A real `prefect server` and `process` worker for the deployment tests, as an operator runs them.

`prefect_server(folder)` starts the server on 127.0.0.1 at a free port with its own PREFECT_HOME
and yields a `PrefectServer`: the API URL, the home folder, the environment every `prefect`
command of the test must use, and the PIDs of what it started. `server.deploy()` creates the
work pool and deploys `prefect.yaml`; `server.start_worker()` starts a worker. On exit (also
when the test fails) every process is stopped by PID: each flow-run process a worker started
(they run in sessions of their own, so the worker's group does not hold them) with everything
below it, each worker, and the server's process group.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
POOL = "rebound-process"
START_TIMEOUT_S = 120.0
RUN_TIMEOUT_S = 300.0
TERMINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _kill_tree(pid: int) -> None:
    """SIGKILL a process, its session's group and everything below it (deepest first)."""
    try:
        proc = psutil.Process(pid)
        below = proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for child in reversed(below):
        _kill_pid(child.pid)
    with _quiet():
        os.killpg(pid, signal.SIGKILL)  # started in its own session: pgid == pid
    _kill_pid(pid)


def _kill_pid(pid: int) -> None:
    with _quiet():
        os.kill(pid, signal.SIGKILL)


@contextmanager
def _quiet() -> Iterator[None]:
    try:
        yield
    except (ProcessLookupError, PermissionError):
        pass


# Prefect's client retries these too (prefect.client.base).
_RETRY_STATUSES = frozenset({408, 429, 502, 503})
_RETRY_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0)

@dataclass
class PrefectServer:
    """A running server: where its API is, its home, and the processes started for it."""

    api_url: str
    home: Path
    env: dict[str, str]
    """The environment of every `prefect` command and worker (API URL, home, quiet settings)."""
    server_pid: int
    worker_pids: list[int] = field(default_factory=list)
    extra_pids: set[int] = field(default_factory=set)
    """Processes a test orphaned on purpose (the Dask workers of a SIGKILLed flow run)."""

    def prefect(self, *args: str, timeout_s: float = 120.0) -> subprocess.CompletedProcess:
        """Run `prefect ARGS` from the project root against this server; raise if it fails."""
        done = subprocess.run([str(BIN / "prefect"), *args], cwd=ROOT, env=self.env,
                              capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise AssertionError(f"prefect {' '.join(args)} exited {done.returncode}:\n"
                                 f"{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        return done

    def deploy(self, pool: str = POOL) -> None:
        """Create the `process` work pool and deploy every deployment of prefect.yaml."""
        self.prefect("work-pool", "create", pool, "--type", "process")
        self.prefect("--no-prompt", "deploy", "--all", timeout_s=180.0)

    def start_worker(self, pool: str = POOL) -> int:
        """Start `prefect worker` on the pool (its log in the home folder); returns its PID."""
        with open(self.home / f"worker-{len(self.worker_pids)}.log", "ab") as log:
            proc = subprocess.Popen([str(BIN / "prefect"), "worker", "start", "--pool", pool],
                                    cwd=ROOT, env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.worker_pids.append(proc.pid)
        return proc.pid

    def flow_run_processes(self) -> list[int]:
        """PIDs of everything the workers started (flow-run processes and their children)."""
        pids: list[int] = []
        for pid in self.worker_pids:
            with _quiet():
                try:
                    pids += [c.pid for c in psutil.Process(pid).children(recursive=True)]
                except psutil.NoSuchProcess:
                    pass
        return pids

    def stop(self) -> None:
        """Stop everything started for this server, by PID; safe to call twice."""
        for pid in self.flow_run_processes():
            _kill_tree(pid)
        for pid in self.worker_pids:
            # `prefect worker` ignores SIGTERM for >25 s (STACK-NOTES): no graceful stop needed.
            _kill_tree(pid)
        for pid in sorted(self.extra_pids):
            _kill_tree(pid)
        _kill_tree(self.server_pid)
        for pid in [*self.worker_pids, self.server_pid]:
            with _quiet():
                try:
                    psutil.Process(pid).wait(timeout=30)
                except psutil.NoSuchProcess:
                    pass

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """One REST call to the server (`api("post", "/flow_runs/filter", json={...})`); the
        decoded JSON. Raises httpx.HTTPStatusError on an error status.

        A status the server means as "try again" (a 503 for a locked SQLite under a burst of
        flow-run writes, as CI saw) is retried with back-off, as Prefect's own client does; the
        server rolled the request back, so a retried POST creates nothing twice."""
        for backoff_s in (*_RETRY_BACKOFF_S, None):
            response = httpx.request(method, f"{self.api_url}{path}", timeout=60.0, **kwargs)
            if response.status_code not in _RETRY_STATUSES or backoff_s is None:
                break
            time.sleep(backoff_s)
        response.raise_for_status()
        return response.json() if response.content else None

    def deployment_id(self, name: str, flow: str = "rebound-train") -> str:
        return str(self.api("get", f"/deployments/name/{flow}/{name}")["id"])

    def create_run(self, deployment: str, parameters: dict[str, Any]) -> dict[str, Any]:
        """A flow run of a deployment (by name), as `prefect deployment run` creates it."""
        return self.api("post", f"/deployments/{self.deployment_id(deployment)}/create_flow_run",
                        json={"parameters": parameters})

    def runs_of(self, deployment: str) -> list[dict[str, Any]]:
        """Every flow run of a deployment, oldest first."""
        return self.api("post", "/flow_runs/filter", json={
            "flow_runs": {"deployment_id": {"any_": [self.deployment_id(deployment)]}},
            "sort": "EXPECTED_START_TIME_ASC"})

    def wait_for_run(self, condition: Callable[[], Any], what: str,
                     timeout_s: float = RUN_TIMEOUT_S) -> Any:
        """Poll condition() (API reads) until it returns something true; that value."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if value := condition():
                return value
            time.sleep(0.25)  # polling the API: a state change has no push channel here
        raise AssertionError(f"{what}: not within {timeout_s:.0f}s\n{self.log_tail()}")

    def wait_for_state(self, flow_run_id: str, states: tuple[str, ...] = TERMINAL,
                       timeout_s: float = RUN_TIMEOUT_S) -> dict[str, Any]:
        """The flow run once its state type is one of states (default: any terminal one)."""
        def reached() -> dict[str, Any] | None:
            run = self.api("get", f"/flow_runs/{flow_run_id}")
            return run if run["state"]["type"] in states else None
        return self.wait_for_run(reached, f"flow run {flow_run_id} in {states}", timeout_s)

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's and the workers' logs, for a failing assertion's message."""
        parts = []
        for log in sorted(self.home.glob("*.log")):
            parts.append(f"--- {log.name}\n{log.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)


def _wait_healthy(api_url: str, proc: subprocess.Popen, home: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log = (home / "server.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"prefect server exited {proc.returncode}:\n{log}")
        try:
            if httpx.get(f"{api_url}/health", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)  # polling a socket that opens once the server has started
    raise RuntimeError(f"prefect server at {api_url} not healthy after {START_TIMEOUT_S:.0f}s")


@contextmanager
def prefect_server(folder: Path, **env: str) -> Iterator[PrefectServer]:
    """Start `prefect server start` on 127.0.0.1 at a free port, home under folder.

    Extra environment variables (e.g. worker settings) go to the server, every `prefect`
    command and every worker. Everything started is stopped by PID on exit, also on failure.
    """
    home = folder / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    base = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    full_env = base | {
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": api_url,
        # The UI calls the API on 4200 unless told otherwise (STACK-NOTES, "Prefect server and UI").
        "PREFECT_UI_API_URL": api_url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "REBOUND_HOME": str(folder / "rebound-home"),
        # Workers pick new runs up within a second (default: every 10 s).
        "PREFECT_WORKER_QUERY_SECONDS": "1",
    } | env
    with open(home / "server.log", "ab") as log:
        proc = subprocess.Popen(
            [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            cwd=folder, env=full_env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
    server = PrefectServer(api_url, home, full_env, proc.pid)
    try:
        _wait_healthy(api_url, proc, home)
        yield server
    finally:
        server.stop()
