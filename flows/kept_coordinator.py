"""A coordinator kept warm between the runs of a REBOUND_HOME: `python -m flows.train` hands its
run to a process that has already imported Prefect, Dask and the rest.

With the API and the cluster kept, what is left of a warm run's start-up is the coordinator's
own imports: ~3 s of one core (Prefect 1.6-1.8 s, distributed 0.5 s, zarr, pydantic, rich...),
paid again by every run. So a run that ends well starts `python -m flows.coordinator_server`
detached (its own session, reachable only through an abstract Unix socket by the same user),
which imports them once and waits. A later `python -m flows.train` of the same key connects,
passes its arguments, environment, working directory and its own stdin, stdout and stderr (the
descriptors themselves), and the server forks: the child becomes the run's coordinator, writing
to the same terminal or pipes, and the command waits for it and exits with its status. It exits
by itself after REBOUND_COORDINATOR_IDLE (default 10m) without a run; 0 turns it off.

The forked coordinator behaves as the command's own process would:
- it runs `flows.train` as __main__ from its first line, after the imports (only our own
  modules, ~0.35 s, are imported fresh in it: no state of ours crosses from one run to the next);
- a run is handed over only under the same key as the server's (interpreter, dependency
  versions, our source files' sizes and mtimes, working directory, environment), and the child
  declines it (the command then runs by itself) unless its Prefect environment, once prepared,
  is exactly the one the server imported Prefect under (the kept API's URL included);
- SIGINT, SIGTERM, SIGHUP and SIGQUIT sent to the command are passed on to it; a command killed
  any other way (SIGKILL) takes it along at once: it watches the command's pidfd;
- the command exits with its status, or dies of the signal that killed it.

This module imports nothing heavy: it runs before the command's own imports.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import secrets
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flows.kept_api import BadIdleSetting, idle_s_from_env, read_live_record, stopped
from flows.kept_cluster import code_and_environment

IDLE_ENV = "REBOUND_COORDINATOR_IDLE"
DEFAULT_IDLE_S = 600.0
RECORD, START_LOCK, LOG = "coordinator.json", "coordinator.lock", "coordinator.log"
START_WAIT_S = 30.0
"""How long a command waits for a server that is still importing before it runs by itself."""
HANDOVER_TIMEOUT_S = 30.0
"""How long a command waits for the server to take its run (the forked coordinator prepares
its environment first) before it runs by itself."""
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
"""What the command passes on to its coordinator (Ctrl-C, a scheduler's stop)."""


@dataclass(frozen=True)
class Handover:
    """What the forked coordinator received: set in it before flows.train runs as __main__."""

    started: float
    """When the command began (time.time()): its start-up counts from there."""
    local_api: Any
    """flows.prefect_env.prepare_environment's answer in the coordinator."""


HANDED_OVER: list[Handover] = []
"""In a coordinator forked by the server: the run it took over (one entry); else empty."""


def handed_over() -> Handover | None:
    return HANDED_OVER[0] if HANDED_OVER else None


def idle_s() -> float:
    """REBOUND_COORDINATOR_IDLE in seconds (BadIdleSetting when it is not a duration)."""
    return idle_s_from_env(IDLE_ENV, DEFAULT_IDLE_S)


def coordinator_key() -> str:
    """What a kept coordinator was started with that a run relies on (the command's environment
    before Rebound prepares it)."""
    payload = {**code_and_environment(), "flags": _interpreter_flags(), "path": sys.path}
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:32]


def _interpreter_flags() -> list[str]:
    """The command line options the command's interpreter runs under (-O, -W, -X...): the
    server is started with the same, and a run under others is not handed over."""
    return subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]


def environment_digest(env: dict[str, str]) -> str:
    """The environment the coordinator imports under, as the server and the child compare it."""
    from flows.kept_cluster import VOLATILE_ENV

    kept = sorted((k, v) for k, v in env.items() if k not in VOLATILE_ENV)
    return hashlib.sha256(json.dumps(kept).encode()).hexdigest()


def _home() -> Path:
    # flows.prefect_env.rebound_home, without its imports.
    return Path(os.environ.get("REBOUND_HOME", ".rebound")).resolve()


def read_record(home: Path) -> dict | None:
    """The kept coordinator's record in REBOUND_HOME when it names a live server of ours."""
    return read_live_record(home / RECORD, "flows.coordinator_server",
                            lambda record: str(record["name"]))


def _usable() -> float:
    """The idle window when this command may hand over or keep a coordinator, else 0."""
    if sys.platform != "linux" or not hasattr(os, "pidfd_open"):
        return 0.0  # abstract sockets, pidfds and fork are what it stands on
    try:
        idle = idle_s()
    except BadIdleSetting as err:  # bad usage: exit 2, one line, nothing started
        sys.stderr.write(f"error: {err}\n")
        raise SystemExit(2) from None
    try:
        api_idle = idle_s_from_env()
    except BadIdleSetting:
        return 0.0  # the run itself says so in one line
    if not os.environ.get("PREFECT_API_URL") and api_idle <= 0:
        return 0.0  # a Prefect API of each run's own: no server could share its environment
    return idle


def _wait_for_start(home: Path) -> None:
    """Wait (at most START_WAIT_S) while a server holds the start lock: it is importing, and
    will be ready before this command could import the same by itself."""
    try:
        fd = os.open(home / START_LOCK, os.O_RDWR)
    except OSError:
        return
    try:
        deadline = time.monotonic() + START_WAIT_S
        while time.monotonic() < deadline:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                time.sleep(0.05)  # polling: flock has no timeout of its own
    finally:
        os.close(fd)


def hand_over(started: float) -> str | None:
    """In `python -m flows.train`, before its imports: hand the run to the kept coordinator of
    this key and exit with its status (this never returns then). Returns the key when this
    command runs by itself (no server, another key, declined), None when it keeps none."""
    if _usable() <= 0:
        return None
    home = _home()
    key = coordinator_key()
    _wait_for_start(home)
    record = read_record(home)
    if record is not None and stopped(int(record["pid"])):
        _put_down(int(record["pid"]))  # it would serve nobody; this run keeps a new one
        return key
    if record is None or record.get("key") != key:
        return key
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(HANDOVER_TIMEOUT_S)
        conn.connect("\0" + str(record["name"]))
        _send(conn, {"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd(),
                     "started": started, "pid": os.getpid()}, fds=[0, 1, 2])
        reader = conn.makefile("rb")
        answer = _read(reader)
        if answer is None or "ready" not in answer:
            conn.close()
            return key
        # Only now may the coordinator run: one that answered after this command gave up
        # reads the end of the stream instead, and exits without touching anything.
        _send(conn, {"go": True})
        conn.settimeout(None)
    except OSError:  # TimeoutError included: a server that answers nothing
        conn.close()
        return key
    _wait_for_coordinator(reader, int(answer["ready"]))
    raise AssertionError("unreachable")  # pragma: no cover


def _put_down(pid: int) -> None:
    """SIGKILL a kept coordinator stopped by a signal, by its PID, and wait for it to go (the
    runs it forked are the commands' own, and go on)."""
    with contextlib.suppress(ProcessLookupError):
        pidfd = os.pidfd_open(pid)
        os.kill(pid, signal.SIGKILL)
        with selectors.DefaultSelector() as sel:
            sel.register(pidfd, selectors.EVENT_READ)
            sel.select(HANDOVER_TIMEOUT_S)
        os.close(pidfd)


def _wait_for_coordinator(reader: Any, pid: int) -> None:
    """The command's life once handed over: pass signals on, then end as the coordinator did."""
    for signum in FORWARDED:
        signal.signal(signum, lambda signum, frame: _pass_on(pid, signum))
    answer = None
    with contextlib.suppress(OSError):
        answer = _read(reader)
    if answer is None:  # the server died: its child may live on, orphaned
        answer = _outlive(pid)
    code = int(answer.get("exit", 1))
    if code < 0:  # killed by a signal: so is the command
        for signum in FORWARDED:
            signal.signal(signum, signal.SIG_DFL)
        sys.stdout.flush()
        os.kill(os.getpid(), -code)
        code = 128 - code
    sys.stdout.flush()
    os._exit(code)


def _pass_on(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _outlive(pid: int) -> dict:
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return {"exit": 1}
    with selectors.DefaultSelector() as sel:
        sel.register(pidfd, selectors.EVENT_READ)
        sel.select()
    os.close(pidfd)
    sys.stderr.write(f"error: the kept coordinator's server died; its run (pid {pid}) ended "
                     "with a status nobody could collect\n")
    return {"exit": 1}


def keep(key: str | None, environment: dict[str, str]) -> int | None:
    """After a run of this command that ran by itself: start the kept coordinator for `key` if
    none runs, in `environment` (the run's, as prepared before Prefect's import). Its PID, or
    None when one was running or none is kept."""
    idle = _usable()
    if key is None or idle <= 0:
        return None
    home = _home()
    home.mkdir(parents=True, exist_ok=True)
    lock_fd = os.open(home / START_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        record = read_record(home)
        if record is not None and record.get("key") == key:
            return None
        # The server inherits the start lock and lets it go once its record is written.
        process = _spawn(home, key, idle, environment, lock_fd)
    finally:
        os.close(lock_fd)
    return process.pid


def _spawn(home: Path, key: str, idle: float, environment: dict[str, str],
           lock_fd: int) -> subprocess.Popen:
    log = open(home / LOG, "ab")  # noqa: SIM115 - the child holds it; ours closes below
    try:
        return subprocess.Popen(
            [sys.executable, *_interpreter_flags(), "-m", "flows.coordinator_server",
             "--key", key,
             "--name", f"rebound-coordinator-{secrets.token_hex(16)}", "--idle-s", str(idle),
             "--record", str(home / RECORD), "--lock-fd", str(lock_fd)],
            env=environment, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            pass_fds=(lock_fd,), start_new_session=True, cwd=os.getcwd())
    finally:
        log.close()


def describe(pid: int) -> str:
    """The one line a run that started the kept coordinator prints after its summary."""
    idle = idle_s()
    window = f"{idle / 60:g} min" if idle >= 60 else f"{idle:g} s"
    return (f"note: a coordinator with Rebound's imports done (pid {pid}) stays up for later "
            f"runs like this one until {window} pass without one ({IDLE_ENV}; 0: none)")


def stop_kept_coordinator(home: Path, timeout_s: float = 30.0) -> int | None:
    """SIGTERM the kept coordinator of `home` by its PID and wait for it to exit; its PID, or
    None when none runs. For benches and tests."""
    from flows.kept_api import terminate

    _wait_for_start(home)  # one still importing records itself first
    record = read_record(home)
    return None if record is None else terminate(int(record["pid"]), timeout_s)


# Messages: a 4-byte length and a JSON document; the first may carry descriptors.
def _send(conn: socket.socket, doc: dict, fds: list[int] | None = None) -> None:
    data = json.dumps(doc).encode()
    frame = struct.pack("!I", len(data)) + data
    if fds:
        sent = socket.send_fds(conn, [frame], fds)
        frame = frame[sent:]
    if frame:
        conn.sendall(frame)


def _read(reader: Any) -> dict | None:
    """The next message from a buffered reader of the socket (None at end of stream)."""
    head = reader.read(4)
    if len(head) < 4:
        return None
    size = struct.unpack("!I", head)[0]
    body = reader.read(size)
    return json.loads(body) if len(body) == size else None


def _receive(conn: socket.socket, fds_out: list[int] | None = None) -> dict | None:
    """The first message a peer sends (None at end of stream): the server's read of a request;
    descriptors that came with it are appended to fds_out (closed when not asked for)."""
    buffer = b""
    while len(buffer) < 4 or len(buffer) < 4 + struct.unpack("!I", buffer[:4])[0]:
        chunk, fds, _, _ = socket.recv_fds(conn, 1 << 16, 8)
        for fd in fds:
            if fds_out is None:
                os.close(fd)
            else:
                fds_out.append(fd)
        if not chunk:
            return None
        buffer += chunk
    return json.loads(buffer[4:4 + struct.unpack("!I", buffer[:4])[0]])
