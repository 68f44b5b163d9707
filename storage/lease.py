"""One coordinator at a time: a run's lease in the store (DESIGN.md section 8, "Lease").

Layout, beside the run's checkpoints::

    <store>/<run_id>/lease/record.json             the lease: holder, epoch, heartbeat, expiry
    <store>/<run_id>/lease/epochs/<epoch>.json     one per epoch ever taken (its first record)

A coordinator *acquires* the lease when nobody else holds a live one (``expires_unix`` in the
future; a holder on this host whose process has exited holds nothing), taking the next epoch through a one-winner create of ``epochs/<epoch>.json``: two
racing takers cannot both get the same epoch. It renews the record every third of its TTL; a
renewal that finds another epoch, or that comes after its own expiry (the process was paused or
starved), fails: that lease is lost for good. A clean exit releases it (expires it now), so the
next coordinator need not wait for the TTL.

**Fencing.** Every checkpoint commit made for a coordinator carries its lease epoch
(``CheckpointStore.save(..., lease_epoch=)``, ``commit_shares(..., lease_epoch=)``); right
before the commit becomes visible, under the commit's lock, the store calls ``check``: a
record with another epoch, or an expired one, refuses the commit with ``LeaseLostError``.

Acquire, renew and release hold a lock on the record (one writer at a time, so a renewal
never overwrites a takeover). A takeover also holds the lock local commits hold around their
rename (``Backend.step_lock`` on the run's ckpt folder): on a local store a takeover and a
fenced commit are therefore ordered, and no commit of a stale epoch can become visible after a
takeover. On fsspec stores a commit's lock is a claim on its own step, which a takeover does not
wait for: there the check runs right before the marker put, and a put delayed past the lease's
expiry can still land after a takeover (see ``check``). Expiry compares ``time.time()`` of
different processes: the hosts' clocks must agree to well under the TTL.

The lease lives outside ``docs/`` so that ``--fresh`` (``delete_run``) keeps it: the
coordinator that starts a run over holds it, and an epoch must never be handed out twice.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from storage.claims import _pid_alive, claimant
from storage.errors import FatalStoreError, StoreError, classify_os_error
from storage.names import validate_run_id

if TYPE_CHECKING:
    from storage.backend import Backend
    from storage.store import CheckpointStore

LEASE_DIR = "lease"
"""Folder of a run that holds its lease (kept by ``delete_run``)."""
_RECORD = "record.json"
_EPOCHS = "epochs"
# How many orphaned epochs (a taker that died between taking an epoch and writing the record,
# its lease since expired) one acquire steps over before giving up.
_MAX_ORPHANS = 100


@dataclass(frozen=True)
class Holder:
    """Who holds a lease: a process on a host, and one acquisition of it (``token``)."""

    host: str
    pid: int
    pid_start: str | None
    """The process's start time (tells a live process from a reused pid)."""
    token: str
    """Random per acquisition: only the same token renews or releases."""

    def is_dead(self) -> bool:
        """True only when the holder is provably gone: a process of this host that has exited
        (or whose pid now belongs to another process). Elsewhere only its expiry tells."""
        return self.host == socket.gethostname() and not _pid_alive(self.pid, self.pid_start)

    def is_this_process(self) -> bool:
        """True when this very process holds it (the same host, pid and process start)."""
        me = claimant()
        return (self.host, self.pid, self.pid_start) == (me["host"], me["pid"], me["pid_start"])

    def __str__(self) -> str:
        return f"{self.host}:{self.pid} (coordinator {self.token[:8]})"


def this_holder() -> Holder:
    """A new holder identity for this process (a fresh token)."""
    me = claimant()
    return Holder(me["host"], me["pid"], me["pid_start"], uuid.uuid4().hex)


@dataclass(frozen=True)
class Lease:
    """One state of a run's lease record."""

    run_id: str
    holder: Holder
    epoch: int
    """Bumped on every takeover; a commit carrying an older epoch is refused."""
    heartbeat_unix: float
    """When the holder last renewed it."""
    expires_unix: float
    """Live until then; after it, anyone may take the run over."""
    ttl_s: float

    def live(self, now: float | None = None) -> bool:
        return (time.time() if now is None else now) < self.expires_unix

    def until(self, now: float | None = None) -> str:
        """When it expires, in UTC and from now: ``2026-05-01 12:00:03 UTC (in 2.1 s)``."""
        now = time.time() if now is None else now
        at = datetime.fromtimestamp(self.expires_unix, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
        left = self.expires_unix - now
        return f"{at} ({'in' if left >= 0 else 'expired'} {abs(left):.1f} s{'' if left >= 0 else ' ago'})"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Lease:
        return cls(run_id=str(doc["run_id"]), holder=Holder(**doc["holder"]),
                   epoch=int(doc["epoch"]), heartbeat_unix=float(doc["heartbeat_unix"]),
                   expires_unix=float(doc["expires_unix"]), ttl_s=float(doc["ttl_s"]))


class LeaseHeld(StoreError):
    """Another coordinator holds a live lease on the run (a second coordinator exits 2)."""

    def __init__(self, lease: Lease, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.lease = lease
        super().__init__(
            f"run {lease.run_id} is held by {lease.holder} until {lease.until(now)} "
            f"(lease epoch {lease.epoch}, last heartbeat {now - lease.heartbeat_unix:.1f} s ago, "
            f"ttl {lease.ttl_s:g} s)")

    def __reduce__(self):  # picklable across process boundaries (Dask/Prefect results)
        return (LeaseHeld, (self.lease,))


class LeaseLostError(FatalStoreError):
    """A commit (or a renewal) of a lease epoch that is no longer the run's live one.

    Fatal: no retry can make a stale epoch current again; the coordinator that held it stops.
    """

    def __init__(self, run_id: str, reason: str, url: str = "") -> None:
        self.run_id = run_id
        self.reason = reason
        self.url, self.errno_name, self.strerror = url, "LEASE_LOST", reason
        StoreError.__init__(self, f"lease lost on run {run_id}: {reason}")

    def __reduce__(self):
        return (LeaseLostError, (self.run_id, self.reason, self.url))


# ---- paths and raw reads -------------------------------------------------------------------
def _dir(run_id: str) -> str:
    return f"{validate_run_id(run_id)}/{LEASE_DIR}"


def _epoch_path(run_id: str, epoch: int) -> str:
    return f"{_dir(run_id)}/{_EPOCHS}/{epoch:012d}.json"


def _lease_lock(backend: Backend, run_id: str) -> AbstractContextManager[bool]:
    """One writer of the lease record at a time (a flock on its folder, or a claim)."""
    return backend.step_lock(f"{_dir(run_id)}/{_RECORD}")


@contextmanager
def _takeover_lock(backend: Backend, run_id: str) -> Iterator[None]:
    """The lease lock, plus on a local store the lock every commit holds around its rename: a
    local step lock is a flock on the folder holding the path, here the run's ckpt folder. So
    a takeover never falls between a commit's fence check and its rename. Renewals need not
    take it (they keep the epoch), so a coordinator paused mid-renewal never blocks commits."""
    with _lease_lock(backend, run_id):
        if backend.atomic_commit:
            with backend.step_lock(f"{validate_run_id(run_id)}/ckpt/.lease"):
                yield
        else:
            yield  # fsspec commits claim their own step: nothing to order with (see `check`)


def _read(backend: Backend, path: str) -> Lease | None:
    try:
        data = backend.read_bytes(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise classify_os_error(e, backend.url, f"reading {path}") from e
    try:
        return Lease.from_json(json.loads(data))
    except (ValueError, KeyError, TypeError) as e:
        raise StoreError(f"{path} is not a lease record: {e}") from None


def _write(backend: Backend, lease: Lease) -> None:
    path = f"{_dir(lease.run_id)}/{_RECORD}"
    try:
        backend.write_atomic(path, json.dumps(lease.to_json(), indent=1).encode())
    except OSError as e:
        raise classify_os_error(e, backend.url, f"writing {path}") from e


def read(store: CheckpointStore, run_id: str) -> Lease | None:
    """The run's lease record; None when no coordinator ever held one."""
    return _read(store.backend, f"{_dir(run_id)}/{_RECORD}")


# ---- the holder's side -----------------------------------------------------------------------
def acquire(store: CheckpointStore, run_id: str, holder: Holder, ttl: timedelta) -> Lease:
    """Take the run's lease for ``holder`` with the next epoch.

    Raises:
        LeaseHeld: someone else holds a live lease (nothing is written then), or won the race
            for the same epoch.
        ValueError: ttl is not positive.
    """
    ttl_s = ttl.total_seconds()
    if ttl_s <= 0:
        raise ValueError(f"lease ttl must be > 0, got {ttl}")
    b = store.backend

    def refuse_if_held() -> Lease | None:
        now = time.time()
        current = read(store, run_id)
        if current is not None and current.live(now) and current.holder != holder and \
                not current.holder.is_dead():
            raise LeaseHeld(current, now)
        return current

    refuse_if_held()  # first without the lock: a refused coordinator writes nothing at all
    with _takeover_lock(b, run_id):
        current = refuse_if_held()
        epoch = (current.epoch if current is not None else 0) + 1
        for _ in range(_MAX_ORPHANS):
            now = time.time()
            lease = Lease(run_id, holder, epoch, now, now + ttl_s, ttl_s)
            body = json.dumps(lease.to_json(), indent=1).encode()
            try:
                won = b.create_exclusive(_epoch_path(run_id, epoch), body)
            except OSError as e:
                raise classify_os_error(e, b.url, f"taking lease epoch {epoch}") from e
            if won:
                _write(b, lease)
                return lease
            # Another taker got this epoch: it holds the run unless it died before writing
            # the record and its lease has expired since (then that epoch is an orphan).
            other = _read(b, _epoch_path(run_id, epoch))
            if other is not None and other.live() and not other.holder.is_dead():
                raise LeaseHeld(other)
            epoch += 1
    raise StoreError(f"run {run_id}: {_MAX_ORPHANS} orphaned lease epochs in a row")


def renew(store: CheckpointStore, lease: Lease) -> Lease:
    """Extend the lease by its TTL from now; the new state.

    Raises:
        LeaseLostError: the record has another epoch (a takeover) or is gone, or this renewal
            comes after the lease's own expiry (the holder was paused or starved): then it is
            lost for good, even if nobody took it over yet.
    """
    b = store.backend
    with _lease_lock(b, lease.run_id):
        now = time.time()
        if now >= lease.expires_unix:
            raise LeaseLostError(lease.run_id, f"epoch {lease.epoch} was not renewed in time "
                                 f"(expired {now - lease.expires_unix:.1f} s ago: the "
                                 "coordinator was paused or starved)", b.url)
        current = read(store, lease.run_id)
        if current is None or current.epoch != lease.epoch or current.holder != lease.holder:
            raise LeaseLostError(lease.run_id, _taken(lease.epoch, current), b.url)
        renewed = replace(lease, heartbeat_unix=now, expires_unix=now + lease.ttl_s)
        _write(b, renewed)
        return renewed


def release(store: CheckpointStore, lease: Lease) -> None:
    """Expire the lease now if it is still ours, so the next coordinator need not wait."""
    b = store.backend
    with _lease_lock(b, lease.run_id):
        current = read(store, lease.run_id)
        if current is not None and current.epoch == lease.epoch and current.holder == lease.holder:
            now = time.time()
            _write(b, replace(current, heartbeat_unix=now, expires_unix=min(now, current.expires_unix)))


def _taken(epoch: int, current: Lease | None) -> str:
    if current is None:
        return f"epoch {epoch}: the lease record is gone"
    return f"epoch {epoch} is stale: {current.holder} took the run over (epoch {current.epoch})"


# ---- the fence -------------------------------------------------------------------------------
def check(backend: Backend, run_id: str, epoch: int) -> None:
    """Refuse unless ``epoch`` is the run's live lease: the fence every fenced commit runs.

    The store calls it under the commit's lock right before the commit becomes visible. What
    remains between this check and the commit: on a local store, only the rename itself, and
    no takeover fits in (it needs the same lock); the record may pass its expiry during those
    microseconds with nobody holding a newer epoch, which harms nobody. On fsspec, one marker
    put: if that put is delayed past the expiry and a new coordinator takes over meanwhile, a
    stale checkpoint can still appear. That is acceptable here because a checkpoint of a step is
    a pure function of the run's config and step (DESIGN.md section 5): the stale commit carries
    the bytes the new coordinator would write for that step, and exactly one commit per step
    still wins.

    Raises:
        LeaseLostError: another epoch holds the run, the record is gone, or it expired.
    """
    current = _read(backend, f"{_dir(run_id)}/{_RECORD}")
    if current is None or current.epoch != epoch:
        raise LeaseLostError(run_id, _taken(epoch, current), backend.url)
    now = time.time()
    if not current.live(now):
        raise LeaseLostError(run_id, f"epoch {epoch} expired {now - current.expires_unix:.1f} s "
                             "ago (its coordinator stopped renewing it)", backend.url)


def fence(backend: Backend, run_id: str, epoch: int | None) -> Callable[[], None] | None:
    """The check a commit carrying ``epoch`` runs under its lock; None for unfenced commits."""
    if epoch is None:
        return None
    return lambda: check(backend, run_id, epoch)
