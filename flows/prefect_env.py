"""One Prefect API for the flow process and every Dask worker it starts.

With no PREFECT_API_URL, Prefect would start a temporary server in the flow process *and in each
worker process* (STACK-NOTES: ~17 s each). So for a local run we pick the port ourselves, put the
URL in the environment before anything spawns, then start a single server there.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

SERVER_STARTUP_TIMEOUT = timedelta(seconds=120)
"""Start-up takes ~11-20 s here; Prefect's own default (20 s) is too close to that."""


def rebound_home() -> Path:
    """Where local runs keep Prefect's database and Dask's scratch space."""
    return Path(os.environ.get("REBOUND_HOME", ".rebound")).resolve()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prepare_environment() -> str | None:
    """Set Prefect's environment for this process and its children; returns a port to serve on.

    Must run before `import prefect`. Returns None when PREFECT_API_URL is already set (a real
    server, or a test harness): then nothing is started.
    """
    home = rebound_home()
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
                          str(int(SERVER_STARTUP_TIMEOUT.total_seconds())))
    os.environ.setdefault("DASK_TEMPORARY_DIRECTORY", str(home / "dask"))
    if os.environ.get("PREFECT_API_URL"):
        return None
    # Our own throwaway server: keep its INFO chatter out of the terminal (the progress bar and
    # the summary say what happened). A user's PREFECT_LOGGING_LEVEL still wins.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    port = _free_port()
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{port}/api"
    return port


def _die_with_parent() -> None:
    """In the server's child process: SIGKILL it when the flow process dies, however it dies.

    A SIGKILLed coordinator runs no atexit handler, and an orphaned server would hold its port
    and database forever. Linux only (prctl); elsewhere the server outlives a killed parent.
    """
    try:
        import ctypes
        import signal

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _server_class() -> type:
    import subprocess
    import sys

    import prefect
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import get_current_settings

    class ChildASGIServer(SubprocessASGIServer):
        """Prefect's temporary server, started so that it dies with this process."""

        def _run_uvicorn_command(self) -> subprocess.Popen:
            # Same command as Prefect's own, plus the parent-death signal.
            return subprocess.Popen(
                args=[sys.executable, "-m", "uvicorn", "--app-dir",
                      str(prefect.__module_path__.parent), "--factory",
                      "prefect.server.api.server:create_app", "--host", "127.0.0.1",
                      "--port", str(self.port), "--log-level", "error", "--lifespan", "on"],
                env={**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
                     "PREFECT__SERVER_FINAL": "1",
                     **get_current_settings().to_environment_variables(exclude_unset=True)},
                preexec_fn=_die_with_parent,
            )

    return ChildASGIServer


@contextmanager
def local_prefect_server(port: int | None) -> Iterator[None]:
    """Serve the Prefect API on 127.0.0.1:port for the duration (no-op when port is None)."""
    if port is None:
        yield
        return
    server = _server_class()(port=port)
    try:
        server.start(timeout=int(SERVER_STARTUP_TIMEOUT.total_seconds()))
        yield
    finally:
        server.stop()
