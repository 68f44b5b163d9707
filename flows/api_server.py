"""`python -m flows.api_server`: the local Prefect API kept between runs (flows/kept_api.py).

Serves Prefect's own app (`create_app`, as Prefect's temporary server does) with uvicorn on
127.0.0.1, and exits on its own once no run has used it for --idle-s seconds. A run uses it
while it holds a shared flock on the users file; the server takes the exclusive lock only to
find out that nobody holds it, and keeps it while it goes away, so that a run arriving then
waits for the exit and starts a new server instead of reaching one that is stopping.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

IDLE_POLL_S = 1.0
"""How often the server asks whether a run holds it: the idle window is minutes, so a second
late is nothing, and a flock attempt costs microseconds."""


def record_is_mine(record: Path) -> bool:
    import json

    try:
        return int(json.loads(record.read_text())["pid"]) == os.getpid()
    except (OSError, ValueError, KeyError, TypeError):
        return False


def exit_when_idle(stop: Callable[[], None], users: Path, record: Path, idle_s: float) -> None:
    """Call stop() once the users file has had no shared lock for idle_s seconds; first
    withdraw the record (when it still names this process), holding the exclusive lock until
    this process ends."""
    fd = os.open(users, os.O_RDWR | os.O_CREAT, 0o600)
    idle_since: float | None = None
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            idle_since = None  # a run holds it
        else:
            now = time.monotonic()
            idle_since = now if idle_since is None else idle_since
            if now - idle_since >= idle_s:
                # Still holding the lock: no run can claim the record between these two lines.
                if record_is_mine(record):
                    record.unlink(missing_ok=True)
                stop()
                return  # the lock goes with the process
            fcntl.flock(fd, fcntl.LOCK_UN)
        time.sleep(IDLE_POLL_S)  # polling: flock offers no "released" notification


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.api_server")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--idle-s", type=float, required=True)
    parser.add_argument("--users", type=Path, required=True)
    parser.add_argument("--record", type=Path, required=True)
    args = parser.parse_args(argv)
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(
        "prefect.server.api.server:create_app", factory=True, host="127.0.0.1", port=args.port,
        log_level="error", lifespan="on"))
    def stop() -> None:
        server.should_exit = True

    threading.Thread(target=exit_when_idle, args=(stop, args.users, args.record, args.idle_s),
                     daemon=True, name="idle-exit").start()
    server.run()
    if record_is_mine(args.record):  # stopped by a signal: leave no record behind
        args.record.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
