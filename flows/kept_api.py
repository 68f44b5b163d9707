"""One local Prefect API shared by the runs of a REBOUND_HOME, kept between them while they come.

Starting Prefect's server costs ~7 s of one core here, nearly all of it importing the server
(`prefect.server.api.server`: 5-7 s), paid again by every run that starts its own. So the first
run starts `python -m flows.api_server` detached, records it in PREFECT_HOME/api.json, and
later runs reuse it; it exits by itself after REBOUND_API_IDLE (default 10m) without a run.

Reuse is safe because:
- every run is its own flow run, as with `prefect server start`, and one server on the SQLite
  file is what two runs at once should share anyway (two servers would both write it);
- a run reuses only a server this home's runs started (its PID alive, its command line ours),
  under the same Prefect version, Python and PREFECT_* settings; anything else gets a server of
  its own that stops with it, as with REBOUND_API_IDLE=0;
- a run holds a shared flock on PREFECT_HOME/api.users from before it looks until it exits
  (SIGKILL included: the kernel drops the lock), and the server leaves only while it holds the
  exclusive lock: it can never go away under a run, nor between a run's look and its use;
- discovery and start-up are serialised by PREFECT_HOME/api.lock: two runs at once start one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

IDLE_ENV = "REBOUND_API_IDLE"
DEFAULT_IDLE_S = 600.0
RECORD, USERS, START_LOCK, LOG = "api.json", "api.users", "api.lock", "api.log"

_USERS_FD: list[int] = []
"""This process's shared lock on the users file, held until it exits."""


class BadIdleSetting(ValueError):
    """REBOUND_API_IDLE is not a duration."""


def idle_s_from_env(name: str = IDLE_ENV, default_s: float = DEFAULT_IDLE_S) -> float:
    """An idle window from the environment variable `name` in seconds: '10m', '90s', '600';
    '0' keeps nothing between runs (the server, or the cluster, stops with each run)."""
    text = os.environ.get(name, "").strip()
    if not text:
        return default_s
    if text in ("0", "0s"):
        return 0.0
    from flows.params import parse_duration_s

    try:
        return parse_duration_s(text)
    except ValueError:
        raise BadIdleSetting(f"{name}={text!r} is not a duration such as 10m, 90s or 0 "
                             "(0: nothing kept between runs)") from None


@dataclass
class _Reservation:
    folder: Path
    key: str
    lock_fd: int
    """The start lock, held from the look that found no server until the start."""
    server_env: Callable[[], dict[str, str]]


@dataclass
class LocalApi:
    """The Prefect API a local run talks to, on 127.0.0.1:port."""

    port: int
    kept: bool
    """True: flows.api_server, outliving this run; False: a child of this process."""
    started_here: bool = True
    pid: int | None = None
    idle_s: float = 0.0
    process: subprocess.Popen | None = field(default=None, repr=False)
    reservation: _Reservation | None = field(default=None, repr=False)
    """Set when this process is to start the kept server: `start()` does, once the run goes
    ahead (bad usage and --help start nothing)."""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> None:
        """Start the kept server this process reserved, record it and let other runs look
        (no-op when there is nothing to start)."""
        reservation, self.reservation = self.reservation, None
        if reservation is None:
            return
        try:
            self.process = _spawn(reservation.folder, self.port, self.idle_s,
                                  reservation.server_env())
            self.pid = self.process.pid
            record = {"pid": self.pid, "port": self.port, "url": self.url,
                      "key": reservation.key, "idle_s": self.idle_s,
                      "prefect": importlib.metadata.version("prefect"),
                      "python": sys.executable, "started_unix": time.time()}
            write_record(reservation.folder / RECORD, record)
        finally:
            os.close(reservation.lock_fd)  # other runs may look now, and find it

    def exit_status(self) -> int | None:
        """The kept server's exit status once it has gone (-1 when not our child), else None."""
        if self.process is not None:
            return self.process.poll()
        return None if self.pid is not None and pid_alive(self.pid) else -1


def settings_key() -> str:
    """What a server is started with that a run relies on: Prefect's version, the interpreter
    and every PREFECT_* setting except the client's own (URL, logging)."""
    prefect = {k: v for k, v in os.environ.items()
               if k.startswith("PREFECT_") and k != "PREFECT_API_URL"
               and not k.startswith("PREFECT_LOGGING_")}
    payload = {"prefect": importlib.metadata.version("prefect"), "python": sys.executable,
               "settings": sorted(prefect.items())}
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:32]


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return process_state(pid) != "Z"  # a zombie is gone for our purposes


def process_state(pid: int) -> str | None:
    """The kernel's one-letter state of `pid` (R, S, D, T stopped, Z zombie...); None when it
    cannot be read (gone, or no /proc)."""
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return None


def stopped(pid: int) -> bool:
    """Whether `pid` is stopped by a signal (SIGSTOP, SIGTSTP...): alive, and serving nobody
    until someone sends SIGCONT."""
    return process_state(pid) == "T"


def why_not_live(record: dict, module: str, token: str) -> str | None:
    """None when the record's PID is alive and runs `python -m module` with `token` among its
    arguments; else why not, in words (a PID the system gave to another process since is not
    ours)."""
    pid = int(record["pid"])
    if not pid_alive(pid):
        return f"pid {pid}, which has exited"
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError as err:
        if sys.platform != "linux":
            return None  # no /proc: trust the live PID
        return f"pid {pid}, whose command line is unreadable ({err.strerror})"
    if module.encode() in argv and token.encode() in argv:
        return None
    shown = b" ".join(argv).decode(errors="replace")[:200]
    return f"pid {pid}, which runs {shown!r}, not {module}"


def look_record(path: Path, module: str,
                token: Callable[[dict], str]) -> tuple[dict | None, str | None]:
    """The record at `path` of a process kept between runs when it names a live
    `python -m module` with token(record) among its arguments, else None; and, when there is
    a record that does not, why not (a server SIGKILLed, or its PID since reused)."""
    try:
        record = json.loads(path.read_text())
        why = why_not_live(record, module, token(record))
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError, KeyError, TypeError) as err:
        return None, f"{path} is unreadable ({type(err).__name__})"
    return (record, None) if why is None else (None, f"{path} names {why}")


def read_live_record(path: Path, module: str, token: Callable[[dict], str]) -> dict | None:
    """The record at `path` of a process kept between runs, when it names a live
    `python -m module` with token(record) among its arguments; else None."""
    return look_record(path, module, token)[0]


def write_record(path: Path, doc: dict) -> None:
    """Write a kept process's record at `path` at once (readers see the old or the new)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, path)


def read_record(folder: Path) -> dict | None:
    """The kept server's record in PREFECT_HOME when it names a live server of ours."""
    return _look(folder)[0]


def _look(folder: Path) -> tuple[dict | None, str | None]:
    return look_record(folder / RECORD, "flows.api_server",
                       lambda record: str(int(record["port"])))


def _spawn(folder: Path, port: int, idle_s: float, env: dict[str, str]) -> subprocess.Popen:
    log = open(folder / LOG, "ab")  # noqa: SIM115 - the child holds it; ours closes below
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "flows.api_server", "--port", str(port), "--idle-s",
             str(idle_s), "--users", str(folder / USERS), "--record", str(folder / RECORD)],
            env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # not in the run's process group: it outlives the run
            cwd=Path(__file__).resolve().parents[1])
    finally:
        log.close()


def claim(folder: Path, idle_s: float, free_port: Callable[[], int],
          server_env: Callable[[], dict[str, str]]) -> LocalApi:
    """This process's API: the kept server of `folder` (PREFECT_HOME), or, when none runs, a
    port reserved for the one this process starts (`LocalApi.start`; until then other runs
    wait to look). Holds this process's use of it until exit. Must run before
    `import prefect`."""
    folder.mkdir(parents=True, exist_ok=True)
    if not _USERS_FD:
        fd = os.open(folder / USERS, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_SH)  # waits out a server that is leaving
        _USERS_FD.append(fd)
    key = settings_key()
    lock_fd = os.open(folder / START_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        record, stale = _look(folder)
    except BaseException:
        os.close(lock_fd)
        raise
    if record is None:
        if stale:
            sys.stderr.write(f"note: {stale}; this run starts a new Prefect API\n")
        return LocalApi(free_port(), kept=True, started_here=True, idle_s=idle_s,
                        reservation=_Reservation(folder, key, lock_fd, server_env))
    os.close(lock_fd)
    if record.get("key") == key:
        return LocalApi(int(record["port"]), kept=True, started_here=False,
                        pid=int(record["pid"]), idle_s=float(record["idle_s"]))
    sys.stderr.write(f"note: the Prefect API kept at {record['url']} (pid {record['pid']}) "
                     "runs another Prefect version or settings; this run starts its own\n")
    return LocalApi(free_port(), kept=False)


def stop_kept_server(folder: Path, timeout_s: float = 30.0) -> int | None:
    """SIGTERM the kept server of `folder` (PREFECT_HOME) by its PID and wait for it to exit;
    its PID, or None when none runs. For benches and tests, which stop what they start."""
    record = read_record(folder)
    if record is None:
        return None
    return terminate(int(record["pid"]), timeout_s)  # its record goes with it


def terminate(pid: int, timeout_s: float) -> int:
    """SIGTERM `pid` (not our child) and wait for it to exit, SIGKILL after timeout_s."""
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline += timeout_s
        time.sleep(0.05)  # polling: a process that is not our child cannot be waited for
    return pid
