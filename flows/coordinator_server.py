"""`python -m flows.coordinator_server`: the coordinator kept warm between runs
(flows/kept_coordinator.py).

Imports what a coordinator imports but our own modules, listens on an abstract Unix socket,
records itself in REBOUND_HOME/coordinator.json and waits. For each command that connects (same
user only) it forks: the child takes the command's descriptors, arguments, environment and
working directory, and runs `flows.train` as __main__; this process reports the child's status
to the command once it has exited. One thread only, so that every fork is a clean copy. Exits
once no run has come or been running for --idle-s seconds; SIGTERM stops it (runs it forked
go on: each is a command's coordinator now).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import runpy
import selectors
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from flows.kept_api import write_record
from flows.kept_coordinator import (
    HANDED_OVER,
    HANDOVER_TIMEOUT_S,
    Handover,
    _read,
    _receive,
    _send,
    environment_digest,
)

PRELOAD = ("prefect", "prefect.main", "prefect.flows", "prefect.tasks", "prefect.artifacts",
           "prefect.flow_runs", "prefect.runtime", "prefect_dask", "dask", "distributed",
           "rich.console", "rich.progress", "rich.table", "rich.live", "pydantic",
           "pydantic.v1", "zarr", "numpy", "xxhash", "fsspec", "yaml", "msgpack",
           "cloudpickle", "statistics", "multiprocessing.forkserver", "email.policy",
           "xml.sax.saxutils")
"""The coordinator's imports that are not ours (STACK-NOTES: Prefect alone is ~1.7 s). Ours are
imported in each forked coordinator, so that nothing of a run's own state outlives it; one
missing here costs its import time there, nothing else."""
REQUEST_TIMEOUT_S = 10.0
"""How long a connected command may take to send its request."""


@dataclass
class _Request:
    conn: socket.socket
    doc: dict
    fds: list[int]


def _write_record(record: Path, key: str, name: str, idle_s: float) -> None:
    write_record(record, {"pid": os.getpid(), "key": key, "name": name, "idle_s": idle_s,
                          "python": sys.executable, "started_unix": time.time()})


def _same_user(conn: socket.socket) -> bool:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _, uid, _ = struct.unpack("3i", creds)
    return uid == os.getuid()


def _accept(listener: socket.socket) -> _Request | None:
    conn, _ = listener.accept()
    fds: list[int] = []
    try:
        conn.settimeout(REQUEST_TIMEOUT_S)
        doc = _receive(conn, fds) if _same_user(conn) else None
        conn.settimeout(None)
    except (OSError, ValueError):
        doc = None
    if doc is None or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        conn.close()
        return None
    return _Request(conn, doc, fds)


def serve(listener: socket.socket, idle_s: float, record: Path) -> _Request | None:
    """Fork a coordinator for each request; returns in the forked child only (with its
    request), or None here once idle for idle_s."""
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    running: dict[int, tuple[int, socket.socket]] = {}  # pidfd: (pid, the command's conn)
    idle_since = time.monotonic()
    while True:
        if not running:
            left = idle_since + idle_s - time.monotonic()
            if left <= 0:
                from flows.api_server import record_is_mine

                if record_is_mine(record):
                    record.unlink(missing_ok=True)
                return None
        for key, _ in sel.select(None if running else left):
            if key.data is None:
                request = _accept(listener)
                if request is None:
                    continue
                pid = os.fork()
                if pid == 0:
                    sel.close()
                    listener.close()
                    for pidfd, (_, conn) in running.items():
                        os.close(pidfd)
                        conn.close()
                    return request
                for fd in request.fds:
                    os.close(fd)
                print(f"command {request.doc.get('pid')}: coordinator {pid}", file=sys.stderr,
                      flush=True)
                pidfd = os.pidfd_open(pid)
                running[pidfd] = (pid, request.conn)
                sel.register(pidfd, selectors.EVENT_READ, pidfd)
            else:
                pidfd = key.data
                pid, conn = running.pop(pidfd)
                sel.unregister(pidfd)
                os.close(pidfd)
                _, status = os.waitpid(pid, 0)
                with contextlib.suppress(OSError):  # the command may be gone
                    _send(conn, {"exit": os.waitstatus_to_exitcode(status)})
                conn.close()
                idle_since = time.monotonic()


def _die_with(pid: int) -> None:
    """SIGKILL this process when the command `pid` dies: a command killed outright takes its
    coordinator along, as when the coordinator was the command's own process."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # already gone
        os.kill(os.getpid(), signal.SIGKILL)
        return

    def watch() -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(pidfd, selectors.EVENT_READ)
            sel.select()
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="command-watch").start()


def become(request: _Request, base_digest: str) -> None:
    """In the forked child: take the command's place and run flows.train as __main__ (exits
    with the run's status); a run whose prepared environment differs from the one this server
    imported under is declined (the command runs by itself)."""
    doc = request.doc
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.setpgid(0, 0)  # the server's process group is not the run's
    _die_with(int(doc["pid"]))
    os.chdir(doc["cwd"])
    os.environ.clear()
    os.environ.update(doc["env"])
    from flows.prefect_env import prepare_environment

    try:
        local_api = prepare_environment()
    except SystemExit:  # bad settings: the command says so itself
        local_api, declined = None, "its settings are refused"
    else:
        declined = None if environment_digest(dict(os.environ)) == base_digest else (
            "its environment differs")
    if declined is not None:
        with contextlib.suppress(OSError):
            _send(request.conn, {"declined": declined})
        os._exit(0)
    for target, fd in enumerate(request.fds):
        os.dup2(fd, target)
        os.close(fd)
    sys.stdout.reconfigure(line_buffering=os.isatty(1))  # type: ignore[union-attr]
    # Prefect's console handler chose its colours for this server's log file: choose again.
    from prefect.logging.configuration import setup_logging

    setup_logging(incremental=False)
    sys.argv = [str(Path(doc["cwd"]) / "flows" / "train.py"), *doc["argv"]]
    HANDED_OVER.append(Handover(started=float(doc["started"]), local_api=local_api))
    _send(request.conn, {"ready": os.getpid()})
    request.conn.settimeout(HANDOVER_TIMEOUT_S)
    try:
        go = _read(request.conn.makefile("rb"))
    except OSError:
        go = None
    if not go or not go.get("go"):
        os._exit(0)  # the command gave up on this server and runs by itself
    request.conn.close()
    runpy.run_module("flows.train", run_name="__main__", alter_sys=True)


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.coordinator_server")
    parser.add_argument("--key", required=True, help="the key it was started for (its record)")
    parser.add_argument("--name", required=True, help="its abstract Unix socket's name")
    parser.add_argument("--idle-s", type=float, required=True)
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--lock-fd", type=int, required=True,
                        help="the start lock, held by the run that started this server: "
                        "released once the record is written")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    base_digest = environment_digest(dict(os.environ))  # before an import can change it
    for module in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind("\0" + args.name)
    listener.listen(16)
    request = None
    try:
        _write_record(args.record, args.key, args.name, args.idle_s)
        os.close(args.lock_fd)  # commands may look now, and find it
        request = serve(listener, args.idle_s, args.record)
    finally:
        if request is None:
            from flows.api_server import record_is_mine

            if record_is_mine(args.record):  # stopped by a signal: leave no record behind
                args.record.unlink(missing_ok=True)
    if request is not None:
        become(request, base_digest)


if __name__ == "__main__":
    main()
