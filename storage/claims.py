"""Claims: one writer at a time per path, on filesystems with no atomic create-if-absent.

Plain fsspec has no conditional put, so writers of one step cannot race for a single object.
Instead each writer puts its own claim object, uniquely named, beside the path
(``<parent>/.claim-<name>-<uuid>``), then lists the claims: it may go ahead only when its claim
is the only live one. With read-after-write and list-after-write consistency (local files,
``memory://``, S3) two writers can never both find themselves alone: if A's listing missed B's
claim, B wrote it after A listed, so after A wrote its own, and B's listing sees A's. When both
see both, both withdraw and try again after a random backoff, within a time budget.

A claim names its holder (host, pid and the pid's start time), so the claim of a writer that died
on this host is ignored at once; a claim from another host counts as live until it is older than
the store's stale age. A writer stalled for longer than that could be overtaken: the documented
limit of this scheme.
"""

from __future__ import annotations

import json
import os
import random
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Protocol

CLAIM_PREFIX = ".claim-"
# A claim file that cannot be parsed is being written right now; past this age its writer died.
_UNREADABLE_GRACE_S = 2.0


class _Files(Protocol):
    def list_dir(self, path: str) -> list[str]: ...
    def read_bytes(self, path: str) -> bytes: ...
    def write_atomic(self, path: str, data: bytes) -> None: ...
    def remove_tree(self, path: str) -> None: ...


def _proc_start(pid: int) -> str | None:
    """The start time of process ``pid`` (tells a live process from a reused pid); None if gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    return data.rsplit(b")", 1)[1].split()[19].decode()  # field 22, counted after "(comm)"


def _pid_alive(pid: object, start: object) -> bool:
    if not isinstance(pid, int):
        return True  # cannot tell: assume alive
    if os.path.exists("/proc/self/stat"):
        return start is not None and _proc_start(pid) == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def claimant() -> dict:
    """Who this process is, as a claim records it."""
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_start": _proc_start(pid)}


class Claims:
    """Claims on the paths of one store."""

    def __init__(self, files: _Files, stale_after: timedelta, budget: timedelta = timedelta(seconds=60)) -> None:
        self._files = files
        self._stale_s = stale_after.total_seconds()
        self._budget_s = budget.total_seconds()

    @contextmanager
    def hold(self, path: str, give_up: Callable[[], bool] | None = None) -> Iterator[bool]:
        """Hold the only live claim on ``path`` for the ``with`` body (yields True).

        Yields False without holding anything when ``give_up()`` turns true while waiting for
        another writer (e.g. the step got committed meanwhile).

        Raises:
            TimeoutError: other writers kept a claim for longer than the budget.
        """
        parent, name = path.rsplit("/", 1)
        prefix = f"{CLAIM_PREFIX}{name}-"
        mine = f"{parent}/{prefix}{uuid.uuid4().hex}"
        rng = random.Random(mine)
        deadline = time.monotonic() + self._budget_s
        delay_s = 0.002
        unreadable: dict[str, float] = {}
        doc = json.dumps({**claimant(), "unix": time.time()}).encode()
        while True:
            self._files.write_atomic(mine, doc)
            others = [
                f"{parent}/{n}" for n in self._files.list_dir(parent)
                if n.startswith(prefix) and f"{parent}/{n}" != mine
            ]
            holders = [o for o in others if self._live(o, unreadable)]
            if not holders:
                break
            self._files.remove_tree(mine)  # withdraw: let the other writer go first
            if give_up is not None and give_up():
                yield False
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} stays claimed by another writer ({holders[0]})")
            time.sleep(rng.uniform(delay_s / 2, delay_s))
            delay_s = min(delay_s * 2, 0.2)
        try:
            yield True
        finally:
            self._files.remove_tree(mine)

    def _live(self, claim: str, unreadable: dict[str, float]) -> bool:
        try:
            doc = json.loads(self._files.read_bytes(claim))
            host, unix = doc["host"], float(doc["unix"])
        except FileNotFoundError:
            return False  # withdrawn meanwhile
        except (ValueError, KeyError, TypeError):
            first = unreadable.setdefault(claim, time.monotonic())
            if time.monotonic() - first < _UNREADABLE_GRACE_S:
                return True
            self._drop(claim)
            return False
        if host == socket.gethostname():
            live = _pid_alive(doc.get("pid"), doc.get("pid_start"))
        else:
            live = time.time() - unix < self._stale_s
        if not live:
            self._drop(claim)
        return live

    def _drop(self, claim: str) -> None:
        """Remove a dead writer's claim (best effort: a failure only leaves it for next time)."""
        try:
            self._files.remove_tree(claim)
        except OSError:
            pass
