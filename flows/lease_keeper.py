"""The coordinator's side of a run's lease (`storage.lease`, DESIGN.md section 8 "Lease").

`LeaseKeeper` takes the lease and renews it every third of its TTL in a daemon thread; the
first renewal that fails (another epoch took over, or the renewal came after the lease's own
expiry because the process was paused) marks it lost for good: a lost lease is never renewed
again. A clean exit releases it, so the next coordinator need not wait for the TTL.

The CLI takes the lease before its cluster starts and holds it for the whole run; `train()`
then finds the lease held by its own process (`flow_lease`). A flow started without the CLI
(a Prefect deployment) takes the lease itself, waiting up to one TTL past a dead holder's
expiry: a deployment run rerun by an automation after a crash starts while the crashed run's
lease is still live.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Protocol

from storage import lease, open_store
from storage.lease import Lease, LeaseHeld, LeaseLostError
from storage.store import CheckpointStore

log = logging.getLogger("rebound.lease")

__all__ = ["HeldLease", "LeaseHeld", "LeaseKeeper", "flow_lease"]


class HeldLease(Protocol):
    """What the flow needs of the lease it runs under."""

    @property
    def epoch(self) -> int:
        """The epoch every commit of this coordinator carries."""
        ...

    def lost(self) -> LeaseLostError | None:
        """Why the lease is lost ("lease lost on run ..."), or None while it is held."""
        ...


class LeaseKeeper:
    """Holds a run's lease: acquired on construction, renewed in a daemon thread, released on
    `close` (also as a context manager)."""

    def __init__(self, store: CheckpointStore, run_id: str, ttl: timedelta,
                 wait: timedelta = timedelta(0)) -> None:
        """Take the lease, waiting up to ``wait`` for a live one to expire unrenewed.

        Raises:
            LeaseHeld: another coordinator holds it (and renewed it while we waited).
        """
        self._store = store
        self._lease = _acquire(store, run_id, ttl, wait)
        self._lost: LeaseLostError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._keep, daemon=True,
                                        name=f"lease-{run_id}")
        self._thread.start()

    @property
    def epoch(self) -> int:
        return self._lease.epoch

    @property
    def lease(self) -> Lease:
        """The lease as last written by this keeper."""
        return self._lease

    def lost(self) -> LeaseLostError | None:
        return self._lost

    def _keep(self) -> None:
        period_s = self._lease.ttl_s / 3
        while not self._stop.wait(period_s):
            try:
                self._lease = lease.renew(self._store, self._lease)
            except LeaseLostError as err:
                self._lost = err
                log.warning("%s", err)
                return  # no un-losing: this coordinator stops, its workers' commits are refused
            except Exception as err:  # noqa: BLE001 - a store hiccup: try again next period
                # A renewal that keeps failing runs into the lease's expiry, and the first
                # renewal after it reports the loss.
                log.warning("renewing the lease of run %s failed: %s", self._lease.run_id, err)

    def close(self, release: bool = True) -> None:
        """Stop renewing; release the lease (expire it now) unless it was lost."""
        self._stop.set()
        self._thread.join(timeout=self._lease.ttl_s)
        if release and self._lost is None:
            try:
                lease.release(self._store, self._lease)
            except Exception as err:  # noqa: BLE001 - unreleased, it expires after its TTL
                log.warning("releasing the lease of run %s failed: %s", self._lease.run_id, err)

    def __enter__(self) -> LeaseKeeper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _acquire(store: CheckpointStore, run_id: str, ttl: timedelta, wait: timedelta) -> Lease:
    deadline = time.time() + wait.total_seconds()
    holder = lease.this_holder()
    while True:
        try:
            return lease.acquire(store, run_id, holder, ttl)
        except LeaseHeld as held:
            # Worth waiting only for a lease that will expire before the deadline; a holder
            # that renews keeps pushing its expiry out, and then we give up.
            if held.lease.expires_unix > deadline:
                raise
            time.sleep(max(0.05, min(held.lease.expires_unix - time.time(), 1.0)))


class _HeldByThisProcess:
    """The lease this process's CLI keeper holds, seen through the store."""

    def __init__(self, store: CheckpointStore, current: Lease) -> None:
        self._store, self._lease = store, current

    @property
    def epoch(self) -> int:
        return self._lease.epoch

    def lost(self) -> LeaseLostError | None:
        try:
            lease.check(self._store.backend, self._lease.run_id, self._lease.epoch)
        except LeaseLostError as err:
            return err
        return None


@contextmanager
def flow_lease(store_url: str, run_id: str, ttl: timedelta) -> Iterator[HeldLease]:
    """The lease `train()` runs under: the one this process already holds (the CLI took it
    before starting the cluster), else its own, taken here and released on exit.

    Raises:
        LeaseHeld: another coordinator holds the run (and renewed its lease while we waited).
    """
    store = open_store(store_url)
    current = lease.read(store, run_id)
    if current is not None and current.holder.is_this_process():
        # Expired or taken over already (the start-up was paused)? `lost()` says so at once.
        yield _HeldByThisProcess(store, current)
        return
    with LeaseKeeper(store, run_id, ttl, wait=ttl) as keeper:
        yield keeper
