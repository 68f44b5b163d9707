"""Watching a batch group while it runs: lost workers, hung tasks, a lost cluster.

Prefect cannot see these (STACK-NOTES): a task whose worker died is silently rerun, KilledWorker
leaves the task run Running forever, and nothing notices a task that stops making progress. So
the flow keeps its own Dask client to the scheduler and watches:
- progress events from the task (one per step): silence longer than the hang timeout means a
  hung task; its worker process is restarted and Dask reruns the group elsewhere;
- the scheduler's `remove-worker` events: when a worker was lost (failure detection time);
- the scheduler itself and the worker count: gone for longer than their timeouts, the run fails
  with a one-line reason instead of waiting forever.
It also keeps the cluster's health: groups failed per worker (`count_failure`), unhealthy
workers quarantined with their reason, and - through the run's Provisioner
(flows/redundancy.py) - a replacement asked for each quarantined worker and, with cold standby,
each lost one.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from distributed import Client

from tasks.progress import PROGRESS_TOPIC

if TYPE_CHECKING:
    from flows.redundancy import Provisioner

T = TypeVar("T")


class InfrastructureError(RuntimeError):
    """The cluster failed (scheduler or every worker gone): not the task's fault."""


class TaskStranded(RuntimeError):
    """The task waits for a worker that will never come (e.g. pinned to a dead one)."""


WORKER_COUNT_EVERY_S = 1.0
"""How often a supervisor counts the scheduler's workers (the every-worker-lost timeout is
a minute)."""
STATE_CHECK_EVERY_S = 5.0
"""How often it asks the scheduler for its task's state when no worker was lost lately."""
STRANDING_WINDOW_S = 30.0
"""After a worker's removal, the task's state is asked for every 0.5 s for this long."""
LOOK_TIMEOUT_S = 10.0
"""A look at the scheduler unanswered this long counts as unanswered: a scheduler whose process
lives but answers nothing (stopped, wedged) would otherwise hold the run forever. One that
answers none for --cluster-timeout is lost, as an unreachable one is."""


@dataclass(frozen=True)
class Watchdog:
    hang_timeout: timedelta = timedelta(minutes=5)
    """No progress event from a running group for this long: its worker is restarted."""
    scheduler_timeout: timedelta = timedelta(seconds=30)
    """Scheduler unreachable for this long: the run fails (cluster lost)."""
    no_worker_timeout: timedelta = timedelta(seconds=60)
    """No worker at all for this long: the run fails (every worker lost)."""
    poll: timedelta = timedelta(milliseconds=200)
    """How often the watcher looks; events themselves arrive as they happen."""
    stranded_after: timedelta = timedelta(seconds=1)
    """A task left unrunnable this long while workers exist is resubmitted elsewhere."""


@dataclass
class WorkerLoss:
    worker: str
    removed_unix: float
    """When the scheduler removed the worker (its clock)."""
    processing: list[str] = field(default_factory=list)
    noticed_unix: float = 0.0
    """When this flow heard of the removal: the end of detection."""
    last_seen_unix: float | None = None
    """The worker's last progress event before it was removed: it was alive then."""
    last_step: int | None = None
    """The step of that event: the last step the worker is known to have completed."""


@dataclass
class AttemptTotals:
    """Per-step seconds a task attempt reported in its progress events."""

    trained_s: float = 0.0
    stall_s: float = 0.0
    steps: int = 0


class ClusterWatch:
    """A client of our own on the scheduler, collecting events for the supervisor."""

    def __init__(self, address: str, run_id: str, connect_timeout: timedelta) -> None:
        self.run_id = run_id
        self.address = address
        self.client = Client(address, timeout=connect_timeout.total_seconds(),
                             set_as_default=False)
        self._lock = threading.Lock()
        self.last_progress_unix = time.time()
        self.last_progress_worker: str | None = None
        self.losses: list[WorkerLoss] = []
        self.hangs: list[dict[str, Any]] = []
        self.quarantined: list[dict[str, Any]] = []
        self.last_seen: dict[str, float] = {}
        self.last_step: dict[str, int] = {}
        """Worker -> the step of its last progress event."""
        self.attempts: dict[str, AttemptTotals] = {}
        self.attempt_workers: dict[str, tuple[str, float]] = {}
        """Attempt name -> (worker, when its first event arrived): who ran which attempt."""
        self.provisioner: Provisioner | None = None
        self.max_failures_per_worker = 0
        self.failures_per_worker: dict[str, int] = {}
        self._restarting: set[str] = set()
        self._unanswered_since: float | None = None
        """time.monotonic() of the first look in a row that went unanswered."""
        self.client.subscribe_topic(PROGRESS_TOPIC, self._on_progress)
        self.client.subscribe_topic("all", self._on_cluster_event)
        self._await_subscribed((PROGRESS_TOPIC, "all"))

    def _await_subscribed(self, topics: tuple[str, ...]) -> None:
        """Return once the scheduler has the subscriptions (sent without an answer): a worker
        removed before then would never be heard of, and the provisioner, which takes the
        workers alive from the scheduler next, would count it alive for the rest of the run."""
        deadline = time.monotonic() + LOOK_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if self.client.run_on_scheduler(_subscribed, topics=topics,
                                                client_id=self.client.id):
                    return
            except Exception:  # noqa: BLE001 - the first look of the run says what is wrong
                return
            time.sleep(0.01)  # polling: the scheduler handles the subscription on its own loop

    def _on_progress(self, event: tuple[float, dict[str, Any]]) -> None:
        _, msg = event
        if msg.get("run_id") == self.run_id:
            with self._lock:
                self.last_progress_unix = time.time()
                self.last_progress_worker = msg.get("worker")
                self.last_seen[str(msg.get("worker"))] = float(msg.get("unix", time.time()))
                if "step" in msg:
                    self.last_step[str(msg.get("worker"))] = int(msg["step"])
                if msg.get("attempt") and msg.get("worker"):
                    self.attempt_workers.setdefault(str(msg["attempt"]),
                                                    (str(msg["worker"]), time.time()))
                if "seconds" in msg and msg.get("attempt"):
                    totals = self.attempts.setdefault(str(msg["attempt"]), AttemptTotals())
                    totals.trained_s += float(msg["seconds"])
                    totals.stall_s += float(msg.get("save_s", 0.0))
                    totals.steps += 1

    def _on_cluster_event(self, event: tuple[float, dict[str, Any]]) -> None:
        # Runs on the client's event-loop thread: record and hand on, never call the scheduler
        # synchronously from here (it would wait on this very thread).
        stamp, msg = event
        if not isinstance(msg, dict):
            return
        provisioner = self.provisioner
        if msg.get("action") == "remove-worker":
            worker = str(msg.get("worker"))
            with self._lock:
                self.losses.append(WorkerLoss(worker, float(stamp),
                                              [str(k) for k in msg.get("processing-tasks", [])],
                                              time.time(), self.last_seen.get(worker),
                                              self.last_step.get(worker)))
            if provisioner is not None:
                provisioner.left(worker)
                # Cold standby: a lost worker is replaced on demand. Ours to skip: a worker we
                # quarantined (replaced already) or restarted (its nanny brings it back).
                if provisioner.standby == "cold" and worker not in self._restarting and \
                        not self.is_quarantined(worker):
                    provisioner.replace(worker, "lost")
        elif msg.get("action") == "add-worker" and provisioner is not None:
            provisioner.joined(str(msg.get("worker")), float(stamp))

    def keep_size(self, provisioner: Provisioner, max_failures_per_worker: int) -> None:
        """Replace quarantined (and, cold, lost) workers through `provisioner`; a worker on
        which `max_failures_per_worker` groups failed is quarantined."""
        self.provisioner = provisioner
        self.max_failures_per_worker = max_failures_per_worker

    def post(self, msg: dict[str, Any]) -> None:
        """Publish the redundancy state on the scheduler without blocking (any thread)."""
        from flows.redundancy import REDUNDANCY_TOPIC

        try:
            self.client.loop.add_callback(self.client.scheduler.log_event,
                                          topic=REDUNDANCY_TOPIC, msg={"run_id": self.run_id} | msg)
        except Exception:  # noqa: BLE001 - a view's update is not worth failing a run over
            pass

    def attempts_since(self, unix: float) -> dict[str, str]:
        """Attempt name -> worker, for attempts whose first event arrived at or after unix."""
        with self._lock:
            return {a: w for a, (w, seen) in self.attempt_workers.items() if seen >= unix}

    def is_quarantined(self, worker: str) -> bool:
        return any(q["worker"] == worker for q in list(self.quarantined))

    def count_failure(self, worker: str, kind: str) -> bool:
        """Count a group failed on `worker`; at --max-failures-per-worker the worker is
        quarantined (and replaced). Returns True when this failure quarantined it. A worker
        already gone or quarantined is not counted: nothing more can be taken from it."""
        if self.is_quarantined(worker) or any(loss.worker == worker for loss in self.losses):
            return False
        with self._lock:
            count = self.failures_per_worker[worker] = self.failures_per_worker.get(worker, 0) + 1
        if self.max_failures_per_worker < 1 or count < self.max_failures_per_worker:
            return False
        self.quarantine(worker, f"{count} batch group(s) failed on it (last: {kind}); "
                                f"--max-failures-per-worker {self.max_failures_per_worker}")
        return True

    def touch(self) -> None:
        """Restart the silence clock (a new group was just submitted)."""
        with self._lock:
            self.last_progress_unix = time.time()

    def silence_s(self) -> float:
        with self._lock:
            return time.time() - self.last_progress_unix

    def scheduler_reachable(self) -> bool:
        """Connected, answering, and not known to be gone (flows.cluster.cluster_gone: a kept
        cluster's server that died or was stopped)."""
        from flows.cluster import cluster_gone

        return (self.client.status == "running" and self._unanswered_since is None
                and not cluster_gone(self.address))

    def ensure_scheduler(self, timeout: timedelta, what: str) -> None:
        """Return once the scheduler is reachable and answers; InfrastructureError after
        timeout (counted from the first unanswered look), at once when it is gone for good."""
        from flows.cluster import cluster_gone

        deadline = (self._unanswered_since or time.monotonic()) + timeout.total_seconds()
        while not self.scheduler_reachable():
            if gone := cluster_gone(self.address):
                raise InfrastructureError(f"{gone} during {what}")  # no use waiting for it
            if time.monotonic() > deadline or self.client.status in ("closed", "closing"):
                raise InfrastructureError(
                    f"Dask scheduler {self.address} unreachable for "
                    f"{timeout.total_seconds():.0f} s during {what} (cluster lost)")
            if self._unanswered_since is not None and self.client.status == "running" \
                    and self.worker_count() >= 0:
                continue  # another look, answered: the wait is over
            time.sleep(0.1)

    def answering(self) -> bool:
        """False while the scheduler leaves our looks unanswered (see LOOK_TIMEOUT_S)."""
        return self._unanswered_since is None

    def _look(self, call: Callable[[], T]) -> T:
        """call() (a round trip to the scheduler bounded by LOOK_TIMEOUT_S), keeping the
        clock of unanswered looks; InfrastructureError at once for a cluster gone for good."""
        from flows.cluster import cluster_gone

        if gone := cluster_gone(self.address):
            raise InfrastructureError(gone)
        try:
            answer = call()
        except TimeoutError:
            with self._lock:
                self._unanswered_since = self._unanswered_since or time.monotonic()
            raise
        with self._lock:
            self._unanswered_since = None
        return answer

    def lost_within(self, seconds: float) -> bool:
        """Whether the scheduler removed a worker in the last `seconds` (as heard here)."""
        with self._lock:
            return any(time.time() - loss.noticed_unix < seconds for loss in self.losses)

    def workers(self) -> dict[str, dict[str, Any]]:
        """The scheduler's workers, address -> its info (a bounded look: raises when it is
        not answered)."""
        client = self.client
        info = self._look(lambda: client.sync(client.scheduler.identity, n_workers=-1,
                                              callback_timeout=LOOK_TIMEOUT_S))
        return dict(info.get("workers", {}))

    def worker_count(self) -> int:
        try:
            return len(self.workers())
        except Exception:  # noqa: BLE001 - unreachable counts as unknown, handled by the caller
            return -1

    def worker_processing(self, key: str) -> str | None:
        """Address of the worker running the task `key`, if any."""
        client = self.client
        try:
            processing = self._look(lambda: client.sync(
                client.scheduler.processing, workers=None, callback_timeout=LOOK_TIMEOUT_S))
        except Exception:  # noqa: BLE001
            return None
        for worker, keys in processing.items():
            if key in keys:
                return str(worker)
        return None

    def task_state(self, key: str) -> str | None:
        """The scheduler's state of a task ('processing', 'no-worker', ...); None if unknown."""
        try:
            return self._look(lambda: self.client.run_on_scheduler(
                _task_state, key=key, callback_timeout=LOOK_TIMEOUT_S))
        except Exception:  # noqa: BLE001
            return None

    def restart_worker(self, worker: str) -> None:
        """Kill and restart one worker process through its nanny (its tasks go elsewhere)."""
        self._restarting.add(worker)
        self.client.restart_workers([worker], timeout=60, raise_for_error=False)

    def quarantine(self, worker: str, reason: str = "") -> None:
        """Retire an unhealthy worker for good (its nanny is closed too: it is not restarted),
        and have it replaced so the cluster keeps its size."""
        if self.is_quarantined(worker):
            return
        # Recorded first: its removal, seen on the event thread, must read as a quarantine.
        self.quarantined.append({"worker": worker, "reason": reason, "unix": time.time()})
        if self.provisioner is not None:
            # Before closing it: the provisioner finds the worker's slot in the cluster by it.
            self.provisioner.replace(worker, "quarantined", reason)
        try:
            # Not retire_workers: it refuses while the worker holds results nobody else has.
            self._look(lambda: self.client.run_on_scheduler(
                _close_worker, worker=worker, callback_timeout=LOOK_TIMEOUT_S))
        except Exception:  # noqa: BLE001 - already gone is as good as closed
            pass

    def abandon(self) -> None:
        """Close the client of a cluster known to be gone for good (flows.cluster.cluster_gone):
        calls blocked on its reconnecting, for up to the client's timeout, fail at once."""
        try:
            self.client.close(timeout=2)
        except Exception:  # noqa: BLE001 - closing a client of a dead scheduler
            pass

    def close(self) -> None:
        if self.provisioner is not None:
            # The cluster is closed next: its workers' removals are no losses to replace.
            self.provisioner.close()
        try:
            # Unsubscribe first, or the scheduler may still push events into a closed comm.
            self.client.unsubscribe_topic(PROGRESS_TOPIC)
            self.client.unsubscribe_topic("all")
            self.client.close(timeout=5)
        except Exception:  # noqa: BLE001 - closing a client of a dead scheduler
            pass


def drop_cancelled_reconnects(record: logging.LogRecord) -> bool:
    """A logging filter for distributed.client: a client closed while it was reconnecting to a
    lost scheduler logs the cancellation as an ERROR with a traceback; the run says what was
    lost in one line of its own."""
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, asyncio.CancelledError)


def _task_state(key: str, dask_scheduler: Any = None) -> str | None:
    """Runs on the scheduler."""
    ts = dask_scheduler.tasks.get(key)
    return None if ts is None else str(ts.state)


def _subscribed(topics: tuple[str, ...], client_id: str, dask_scheduler: Any = None) -> bool:
    """Runs on the scheduler: whether client_id receives every one of topics' events."""
    broker = getattr(dask_scheduler, "_broker", None)
    if broker is None or not hasattr(broker, "_topics"):
        return True  # another Dask: nothing to check against
    return all(client_id in broker._topics[topic].subscribers for topic in topics)


def _close_worker(worker: str, dask_scheduler: Any = None) -> None:
    """Runs on the scheduler: tell the worker (and its nanny) to shut down for good."""
    dask_scheduler.close_worker(worker)


def supervise(dask_future: Any, watch: ClusterWatch, dog: Watchdog, what: str) -> None:
    """Block until dask_future is done, acting on hangs and failing on a lost cluster.

    Raises:
        InfrastructureError: the scheduler or every worker stayed gone past its timeout.
    """
    watch.touch()
    workerless_since: float | None = None
    unrunnable_since: float | None = None
    next_worker_check = next_state_check = 0.0
    # Woken the moment the task ends (the next group is submitted without a poll's delay);
    # between, the looks below run on the poll's beat.
    finished = threading.Event()
    dask_future.add_done_callback(lambda _: finished.set())
    while not finished.wait(dog.poll.total_seconds()) and not dask_future.done():
        now = time.monotonic()
        if not watch.scheduler_reachable():
            watch.ensure_scheduler(dog.scheduler_timeout, what)
            continue
        # Each look below is a round trip to the scheduler, which shares the coordinator's
        # cores with training: as often as the timeouts they serve need, not every poll.
        if workerless_since is not None or now >= next_worker_check:
            next_worker_check = now + WORKER_COUNT_EVERY_S
            if watch.worker_count() == 0:
                workerless_since = workerless_since or now
                if now - workerless_since > dog.no_worker_timeout.total_seconds():
                    raise InfrastructureError(
                        f"every Dask worker lost for {dog.no_worker_timeout.total_seconds():.0f}"
                        f" s during {what}")
                continue
            workerless_since = None
        if now >= next_state_check:
            # Dask keeps a task pinned to a worker that died in 'no-worker' even when its
            # restriction is loose and other workers are idle: notice, and resubmit it. Only a
            # worker's removal strands a task, so the look is frequent only after one.
            recent_loss = watch.lost_within(STRANDING_WINDOW_S)
            next_state_check = now + (0.5 if recent_loss else STATE_CHECK_EVERY_S)
            if watch.task_state(dask_future.key) == "no-worker":
                unrunnable_since = unrunnable_since or now
                if now - unrunnable_since > dog.stranded_after.total_seconds():
                    raise TaskStranded(f"{what} was left without a worker by the scheduler")
            else:
                unrunnable_since = None
        if watch.silence_s() > dog.hang_timeout.total_seconds():
            worker = watch.worker_processing(dask_future.key)
            if worker is None:
                raise TaskStranded(f"{what} made no progress for "
                                   f"{dog.hang_timeout.total_seconds():.0f} s on no worker")
            watch.hangs.append({"worker": worker, "detected_unix": time.time(),
                                "silence_s": round(watch.silence_s(), 3)})
            watch.restart_worker(worker)
            watch.touch()
    if dask_future.status == "cancelled" or not watch.scheduler_reachable():
        # A lost scheduler cancels every future: tell that apart from a task's own failure.
        watch.ensure_scheduler(dog.scheduler_timeout, what)
