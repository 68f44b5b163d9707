"""`--async-save` inside a batch group: a checkpoint stops training only for a snapshot of the
state; hashing, writing, the commit and retention run on a background thread of the worker.

The worker keeps one saver for all its groups, so the snapshot buffers are allocated once. At
most one save is in flight. A group's end checkpoint commits before the group returns where the
flow needs it (an epoch's end is evaluated from the store; the run's last group); otherwise it
too is written in the background, and the next group on the worker waits for it before it
starts (its failure then fails that group, whose retry resumes from what did commit). What a
background save did (its commit, its bytes) is recorded on the training thread, between steps.
A background failure is raised on the training thread as the store raised it: a full disk is
fatal for the run, a transient error that outlived the retries fails the task (which is retried),
a lost lease stops the coordinator's work.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from storage import CheckpointRef
from storage.async_save import AsyncSaver, BackgroundSaveError
from storage.faults import ENV as STORAGE_FAULT_ENV
from storage.store import CheckpointStore, SaveStats
from tasks.jobs import GroupJob, GroupResult
from tasks.worker_cache import WarmTrainer

log = logging.getLogger("rebound.saves")
T = TypeVar("T")

_saver: AsyncSaver | None = None
_saver_lock = threading.Lock()


def worker_saver() -> AsyncSaver:
    """This worker process's saver (its buffers serve every group it trains)."""
    global _saver
    with _saver_lock:
        if _saver is None:
            _saver = AsyncSaver()
        return _saver


_committed: deque[tuple[CheckpointRef, SaveStats]] = deque()
"""Background commits not yet recorded by a group (a group's end may be recorded by the next)."""
_pending_end: int | None = None
"""The step of a group's end checkpoint still being written after its group returned."""


def settle_previous() -> float:
    """Before a group starts on this worker: wait for the save still in flight. When it is the
    previous group's end checkpoint and it failed, raise that failure (the flow took the group
    as done; this group's retry then resumes from the newest checkpoint that did commit). A save
    an earlier, failed attempt left behind is only logged: that attempt's error was reported.
    Returns the seconds waited (training stood still for them)."""
    global _pending_end
    t0 = time.perf_counter()
    failure = worker_saver().wait_quietly()
    pending, _pending_end = _pending_end, None
    if failure is not None:
        if pending is not None:
            raise as_raised(failure)
        log.warning("%s (after its attempt had failed)", failure)
    return time.perf_counter() - t0


class StepDrag:
    """What background saves cost training beyond their stall: the extra seconds of the steps
    that ran while a save was in flight, over the median step of this worker with none in
    flight (kept across groups, so a group whose every step overlaps a save still has one)."""

    _quiet: deque[float] = deque(maxlen=64)

    def __init__(self) -> None:
        self._busy: list[float] = []

    def add(self, seconds: float, save_in_flight: bool) -> None:
        """One training step, and whether a save was in flight when it started."""
        (self._busy.append if save_in_flight else StepDrag._quiet.append)(seconds)

    @property
    def overlapped(self) -> int:
        """Steps so far that ran while a save was in flight: with none, ``seconds`` measured
        nothing (a zero that says nothing about what a save costs)."""
        return len(self._busy) if StepDrag._quiet else 0

    def seconds(self) -> float:
        """The extra step seconds so far (0 until a step without a save was seen)."""
        if not StepDrag._quiet or not self._busy:
            return 0.0
        baseline = statistics.median(StepDrag._quiet)
        return max(0.0, sum(self._busy) - baseline * len(self._busy))


class BackgroundCommits:
    """The training thread's side of this worker's saver: each call raises a background failure
    as the store raised it, and hands every commit finished meanwhile to ``on_commit``."""

    def __init__(self, on_commit: Callable[[CheckpointRef, SaveStats], None],
                 done: deque[tuple[CheckpointRef, SaveStats]]) -> None:
        self._on_commit = on_commit
        self._saver = worker_saver()
        self._done = done
        """Filled by the background thread, emptied by ``record`` on the training thread."""

    def _through(self, call: Callable[[], T]) -> T:
        try:
            return call()
        except BackgroundSaveError as err:
            raise as_raised(err) from None
        finally:
            self.record()

    def _settle_in_flight(self) -> float:
        t0 = time.perf_counter()
        self._through(self._saver.wait)
        return time.perf_counter() - t0

    def record(self) -> None:
        """Hand every save committed since the last look to ``on_commit`` (training thread)."""
        while self._done:
            self._on_commit(*self._done.popleft())

    @property
    def busy(self) -> bool:
        """Whether a save is in flight."""
        return self._saver.busy

    def poll(self) -> None:
        """Raise a background failure as soon as it is known; record finished saves."""
        self._through(self._saver.poll)


class GroupSaves(BackgroundCommits):
    """One group's background checkpoints."""

    def __init__(self, store: CheckpointStore, job: GroupJob, result: GroupResult,
                 on_commit: Callable[[CheckpointRef, SaveStats], None]) -> None:
        super().__init__(on_commit, _committed)
        self._store = store
        self._job = job
        self._result = result
        settle_previous()
        self.record()  # the previous group's end, committed since it returned

    def submit(self, warm: WarmTrainer, extra: dict[str, Any], group_end: bool = False,
               before: Callable[[], None] | None = None) -> float:
        """Snapshot the trainer's state and save it in the background; returns the stall.
        ``group_end``: the group returns before this commit; the warm state learns its ref
        when it lands (the next group on this worker waits for it before it starts).
        ``before`` runs once the save in flight has ended, just before this one starts (a
        fault armed for this save must not strike the one before)."""
        global _pending_end
        waited = self._settle_in_flight() if before is not None else 0.0
        if before is not None:
            before()
        run, job = self._job.run, self._job
        trainer = warm.trainer
        tensors, meta = trainer.capture(extra)
        meta["config_hash"] = run.config_hash
        step = trainer.step

        def write(snapshot: Mapping[str, Any]) -> CheckpointRef:
            try:
                ref = self._store.save(run.run_id, step, snapshot, meta, lease_epoch=run.lease_epoch)
            finally:
                os.environ.pop(STORAGE_FAULT_ENV, None)  # an armed fault is for one save only
            stats = self._store.last_save_stats or SaveStats()
            # Retention, off the training path too (the checkpoint just written is not read back).
            self._store.gc(run.run_id, keep_last=run.keep_last, protect=job.protect_steps,
                           just_committed=ref)
            if group_end:
                warm.at_ref = ref  # read only after settle_previous() has waited for this
            warm.lineage = ref  # saves commit in order: the newest of the memory's history
            self._done.append((ref, stats))
            return ref

        stall = self._through(lambda: self._saver.submit(f"{run.run_id}@{step}", tensors, write))
        stall += waited
        self._result.ckpt_s += stall
        self._result.background_stall_s += stall
        self._result.background_saves += 1
        if group_end:
            _pending_end = step
        return stall

    def wait(self) -> float:
        """Wait for the save in flight (stall); raise its failure."""
        waited = self._settle_in_flight()
        self._result.ckpt_s += waited
        return waited


def as_raised(err: BackgroundSaveError) -> BaseException:
    """The store's own exception, so the flow classifies it as for a synchronous save."""
    cause = err.__cause__
    return cause if isinstance(cause, Exception) else err


__all__ = ["BackgroundCommits", "GroupSaves", "StepDrag", "as_raised", "settle_previous",
           "worker_saver"]
