"""Keep the cluster at its size (issue 9, redundancy; DESIGN.md section 8).

Hot standby starts the cluster with its spares running; cold standby starts only the workers that
hold a rank and asks for a new one when a worker is lost. Either way a quarantined worker (it
failed a health probe, or too many groups failed on it) is replaced, so the cluster keeps its
size instead of shrinking with each quarantine. The flow's ClusterWatch (flows/supervise.py)
tells the Provisioner what the scheduler sees; the Provisioner asks for workers and records
what each replacement cost (request to join).

Who starts the replacement:
- A LocalCluster this process started (flows.cluster.MANAGERS, by scheduler address), or the
  one a kept cluster's process holds (flows/kept_cluster.py, through its proxy). A
  SpecCluster counts workers by slot (`worker_spec`, one name each), not by live process, and a
  slot's nanny restarts its worker process when that process dies. So for a SIGKILLed worker,
  `scale(target)` adds no slot: the nanny's restart (same name, new process, new address) is the
  new worker, and the cluster never ends up bigger than its target. A quarantined worker's
  nanny is closed with it (it must not come back), so its slot is dropped first and
  `scale(target)` opens a new one.
- Another manager registered there (anything with `scale(n)`): `scale(target)`.
- No manager (an external --cluster): said in one log line; the replacement is the next new
  worker to join the scheduler.
A request is matched with the first worker that joins after it and was never seen before (in
request order): exact when one replacement is under way at a time, as in every failure the
tests inject; two at once may be credited to each other.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Literal

from flows.cluster import MANAGERS, rescale, running_workers

if TYPE_CHECKING:
    from flows.params import TrainParams
    from flows.supervise import ClusterWatch

REDUNDANCY_TOPIC = "rebound-redundancy"
"""Scheduler event topic: the redundancy state, posted on every change (the progress view)."""


def local_cluster_size(params: TrainParams) -> int:
    """Workers a LocalCluster starts with: every rank, plus the spares when they stand by hot
    (cold spares start only when a failure calls for one)."""
    return params.ranks_total + (params.spares if params.standby == "hot" else 0)


@dataclass
class Replacement:
    """One worker asked for in place of another."""

    for_worker: str
    why: Literal["lost", "quarantined"]
    requested_unix: float
    joined_unix: float | None = None
    worker: str | None = None
    """The new worker's address, once it joined."""

    def entry(self) -> dict[str, Any]:
        return {"for": self.for_worker, "why": self.why,
                "requested_unix": round(self.requested_unix, 3),
                "joined_unix": None if self.joined_unix is None else round(self.joined_unix, 3),
                "worker": self.worker}


class Provisioner:
    """Keeps the cluster at `target` workers: asks its manager for replacements, or waits for
    workers to join where there is none. Thread-safe: events arrive on the client's thread."""

    def __init__(self, address: str, standby: str, spares_wanted: int, target: int,
                 manager: Any | None, alive: set[str], say: Callable[[str], None],
                 post: Callable[[dict[str, Any]], None], settle_timeout: timedelta) -> None:
        self.address = address
        self.standby = standby
        self.spares_wanted = spares_wanted
        self.target = target
        self.manager = manager
        self.say = say
        self.post = post
        self.settle_timeout = settle_timeout
        self.start_size = len(alive)
        self.replacements: list[Replacement] = []
        self._alive = set(alive)
        self._known = set(alive)
        self._quarantined = 0
        self._closed = False
        self._lock = threading.Lock()

    @classmethod
    def for_run(cls, watch: ClusterWatch, params: TrainParams) -> Provisioner:
        """The run's provisioner on the watch's scheduler, with the manager when there is one."""
        manager = MANAGERS.get(watch.address)
        target = local_cluster_size(params)
        if manager is not None:
            try:
                # A LocalCluster registers its workers as it starts them: count them all.
                watch.client.wait_for_workers(
                    target, timeout=params.watchdog.no_worker_timeout.total_seconds())
            except TimeoutError:
                pass
        alive = set(watch.workers())
        if manager is None:
            target = len(alive)  # an external cluster keeps the size it has
        provisioner = cls(watch.address, params.standby, params.spares, target, manager, alive,
                          _run_say(), watch.post, params.watchdog.no_worker_timeout)
        provisioner.publish()
        return provisioner

    # -- what the scheduler reports (ClusterWatch's event thread) ------------------------------

    def joined(self, worker: str, unix: float) -> None:
        """A worker joined the scheduler: the replacement of the oldest open request if new."""
        with self._lock:
            self._alive.add(worker)
            if worker in self._known:
                return
            self._known.add(worker)
            waiting = next((r for r in self.replacements if r.worker is None), None)
            if waiting is not None:
                waiting.worker, waiting.joined_unix = worker, unix
        if waiting is not None:
            self.say(f"{worker} joined in place of {waiting.for_worker} ({waiting.why}) "
                     f"{max(0.0, unix - waiting.requested_unix):.1f} s after the request")
        self.publish()

    def left(self, worker: str) -> None:
        with self._lock:
            self._alive.discard(worker)
        self.publish()

    # -- asking for workers -------------------------------------------------------------------

    def replace(self, worker: str, why: Literal["lost", "quarantined"], reason: str = "") -> None:
        """Ask for a worker in place of `worker` (once per worker); returns at once."""
        with self._lock:
            if self._closed or any(r.for_worker == worker for r in self.replacements):
                return
            self.replacements.append(Replacement(worker, why, time.time()))
            self._quarantined += why == "quarantined"
        cause = f"quarantined ({reason})" if why == "quarantined" and reason else why
        if self.manager is None:
            self.say(f"{worker} {cause}: no cluster manager for {self.address}, waiting for a "
                     "worker to join in its place")
        else:
            self._ask_manager(worker if why == "quarantined" else None)
            self.say(f"{worker} {cause}: asked the cluster for a worker in its place "
                     f"({self.target} wanted)")
        self.publish()

    def _ask_manager(self, drop: str | None) -> None:
        """scale(target) on the manager's own event loop; the slot of `drop` is given to a new
        worker first. A kept cluster's proxy (flows/kept_cluster.py) does the same in the
        process that holds the cluster."""
        manager = self.manager
        fresh = f"replacement-{len(self.replacements)}"
        try:
            if hasattr(manager, "replace_worker"):
                manager.replace_worker(drop, self.target, fresh, self.say)
            else:
                manager.loop.add_callback(rescale, manager, drop, self.target, fresh)
        except Exception as err:  # noqa: BLE001 - a closing cluster: the run ends anyway
            self.say(f"could not ask the cluster for a worker: {type(err).__name__}: {err}")

    # -- the end of the run -------------------------------------------------------------------

    def pending(self) -> list[Replacement]:
        with self._lock:
            return [r for r in self.replacements if r.worker is None]

    def settle(self, reachable: Callable[[], bool]) -> None:
        """Wait (bounded by settle_timeout) for the replacements the manager is starting to
        join, so that the size reported at the end is the one the cluster is kept at. Without
        a manager nobody was asked: nothing to wait for."""
        deadline = time.monotonic() + self.settle_timeout.total_seconds()
        while self.manager is not None and self.pending() and reachable() and \
                time.monotonic() < deadline:
            time.sleep(0.1)  # polling: each join arrives as an event on another thread

    def close(self) -> None:
        """No more requests (the cluster is about to be closed and its workers removed)."""
        with self._lock:
            self._closed = True

    def publish(self) -> None:
        with self._lock:
            msg = {"standby": self.standby, "workers": len(self._alive),
                   "target": self.target, "quarantined": self._quarantined,
                   "replacing": sum(r.worker is None for r in self.replacements)}
        self.post(msg)

    def state(self, roles: dict[str, str], spares: list[str],
              quarantined: list[dict[str, Any]], end_size: int) -> dict[str, Any]:
        """summary["redundancy"] (DESIGN.md section 8)."""
        with self._lock:
            replacements = [r.entry() for r in self.replacements]
        return {"standby": self.standby, "spares_wanted": self.spares_wanted,
                "spares": spares, "roles": roles,
                "quarantined": [{"worker": q["worker"], "reason": q.get("reason", ""),
                                 "unix": round(q["unix"], 3)} for q in quarantined],
                "replacements": replacements,
                "cluster_size": {"start": self.start_size, "end": end_size,
                                 "target": self.target}}


def _run_say() -> Callable[[str], None]:
    """One line to the run's Prefect log and the terminal, from any thread (the run logger is
    taken here, in the flow's thread: Prefect finds it through a context variable)."""
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError
    from rich.console import Console

    try:
        logger: Any = get_run_logger()
    except MissingContextError:
        logger = logging.getLogger("rebound.redundancy")
    console = Console(stderr=True)

    def say(line: str) -> None:
        logger.info(line)
        console.print(line, style="yellow", soft_wrap=True, markup=False, highlight=False)

    return say


def redundancy_state(watch: ClusterWatch, ranks: Any | None,
                     last_worker: str | None) -> dict[str, Any] | None:
    """The run's redundancy state at its end, once the replacements asked for have joined.

    Roles come from the data-parallel groups (`ranks.roles()`, `ranks.spares()`); on the
    single-rank path the role is the last worker that ran a group, and every other running
    worker is a spare.
    """
    provisioner = watch.provisioner
    if provisioner is None:
        return None
    provisioner.settle(watch.scheduler_reachable)
    quarantined = {q["worker"] for q in watch.quarantined}
    if ranks is not None:
        roles, spares = ranks.roles(), ranks.spares()
    else:
        roles = {last_worker: "rank 0"} if last_worker else {}
        spares = sorted(w for w in running_workers(watch)
                        if w not in roles and w not in quarantined)
    return provisioner.state(roles, spares, watch.quarantined, watch.worker_count())
