"""One Prefect API for the flow process and every Dask worker it starts.

With no PREFECT_API_URL, Prefect would start a temporary server in the flow process *and in each
worker process* (STACK-NOTES: ~17 s each). So for a local run we find or start one server
ourselves, put its URL in the environment before anything spawns, and everything reports there:
the server kept between the runs of a REBOUND_HOME (flows/kept_api.py), or with
REBOUND_API_IDLE=0 a server of the run's own, stopped with it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

from flows.kept_api import BadIdleSetting, LocalApi, claim, idle_s_from_env
from flows.versions import UnsupportedVersion, check_versions

SERVER_STARTUP_TIMEOUT = timedelta(seconds=120)
"""Start-up takes ~11-20 s here; Prefect's own default (20 s) is too close to that."""


def rebound_home() -> Path:
    """Where local runs keep Prefect's database and Dask's scratch space."""
    return Path(os.environ.get("REBOUND_HOME", ".rebound")).resolve()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def prepare_environment(keep_api: bool = True) -> LocalApi | None:
    """Set Prefect's environment for this process and its children; returns the local API to
    use, or None when PREFECT_API_URL is already set (a real server, or a test harness): then
    nothing is started.

    keep_api: reuse the server kept for REBOUND_HOME between runs, starting it if none runs
    (flows/kept_api.py; REBOUND_API_IDLE=0 turns that off); False: a server of this process's
    own, stopped with it (benches that start one for all their runs). Must run before
    `import prefect`.
    """
    try:
        check_versions()
    except UnsupportedVersion as err:
        raise SystemExit(f"error: {err}") from None
    home = rebound_home()
    os.environ.setdefault("PREFECT_HOME", str(home / "prefect"))
    # Prefect creates its home without parents at import and only warns when it cannot
    # ("Failed to create the Prefect home directory" on a fresh clone): create it first.
    with contextlib.suppress(OSError):  # unwritable: Prefect's own warning says so
        Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS",
                          str(int(SERVER_STARTUP_TIMEOUT.total_seconds())))
    os.environ.setdefault("DASK_TEMPORARY_DIRECTORY", str(home / "dask"))
    if os.environ.get("PREFECT_API_URL"):
        return None
    # Our own server: keep its INFO chatter out of the terminal (the progress bar and the
    # summary say what happened). A user's PREFECT_LOGGING_LEVEL still wins.
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    try:
        idle_s = idle_s_from_env() if keep_api else 0.0
    except BadIdleSetting as err:  # bad usage: exit 2, one line, nothing started
        sys.stderr.write(f"error: {err}\n")
        raise SystemExit(2) from None
    if idle_s > 0:
        api = claim(Path(os.environ["PREFECT_HOME"]).expanduser(), idle_s, _free_port,
                    _server_env)
    else:
        api = LocalApi(_free_port(), kept=False)
    os.environ["PREFECT_API_URL"] = api.url
    return api


def die_with_parent() -> None:
    """In a child process (the Prefect server, the workers' forkserver): SIGKILL it when the
    flow process dies, however it dies.

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


def _uvicorn_command(port: int) -> list[str]:
    """The command Prefect 3.9 runs for its own temporary server (SubprocessASGIServer), through
    public entry points only: uvicorn and the app factory `create_app`."""
    import importlib.util
    import sys

    # Found without importing Prefect (2 s here): the server starts before the flow's imports.
    spec = importlib.util.find_spec("prefect")
    assert spec is not None and spec.origin is not None, "prefect is a dependency"
    return [sys.executable, "-m", "uvicorn", "--app-dir", str(Path(spec.origin).parent.parent),
            "--factory", "prefect.server.api.server:create_app", "--host", "127.0.0.1",
            "--port", str(port), "--log-level", "error", "--lifespan", "on"]


def _server_env() -> dict[str, str]:
    # The flags Prefect gives its temporary server (no UI, ephemeral services). Its other
    # settings it reads as this process does: the same environment, PREFECT_HOME profile and
    # working directory (prepare_environment set what Rebound chooses).
    return {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
            "PREFECT__SERVER_FINAL": "1"}


def _wait_healthy(exit_status: Callable[[], int | None], port: int,
                  timeout: timedelta) -> None:
    """Return once the API answers /health; RuntimeError (one line) when it never does, or
    when exit_status() says the server has exited."""
    url = f"http://127.0.0.1:{port}/api/health"
    deadline = time.monotonic() + timeout.total_seconds()
    while time.monotonic() < deadline:
        status = exit_status()
        if status is not None:
            raise RuntimeError(f"the Prefect server on port {port} exited with status "
                               f"{status} while starting")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)  # polling: the server offers no readiness signal other than /health
    raise RuntimeError(f"the Prefect server on port {port} did not answer within "
                       f"{timeout.total_seconds():.0f} s")


@contextmanager
def local_prefect_server(api: LocalApi | None) -> Iterator[None]:
    """The Prefect API on 127.0.0.1 for the duration: a kept server is waited for and left
    running; a server of this process's own is started and stopped (no-op when api is None)."""
    if api is None:
        yield
        return
    if api.kept:
        api.start()  # when this run is the one to start it
        _wait_healthy(api.exit_status, api.port, SERVER_STARTUP_TIMEOUT)
        yield
        return
    port = api.port
    # Our own child process rather than a subclass of Prefect's private SubprocessASGIServer:
    # the parent-death signal needs preexec_fn, and a private hook can change in any release.
    process = subprocess.Popen(_uvicorn_command(port), env=_server_env(),
                               preexec_fn=die_with_parent)
    try:
        _wait_healthy(process.poll, port, SERVER_STARTUP_TIMEOUT)
        yield
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class ServerInBackground:
    """Start the Prefect server in a thread while the rest starts; `ready()` waits for it.

    The thread lives until exit: the server's parent-death signal fires when the *thread* that
    started it ends (prctl semantics), so the starting thread must outlive the server.
    Entering it twice is entering it once (the CLI starts it before its imports, then holds it
    for the run); leaving it stops the server.
    """

    def __init__(self, api: LocalApi | None) -> None:
        self.api = api
        self._cm = local_prefect_server(api)
        self._error: BaseException | None = None
        self._up = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True, name="prefect-server")

    def _serve(self) -> None:
        try:
            with self._cm:
                self._up.set()
                self._stop.wait()
        except BaseException as err:  # noqa: BLE001 - re-raised in ready()
            self._error = err
        finally:
            self._up.set()

    def __enter__(self) -> Callable[[], None]:
        if self._thread.ident is None:
            self._thread.start()
        return self.ready

    def ready(self) -> None:
        self._up.wait()
        if self._error is not None:
            raise self._error

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join(timeout=30)
