"""`--async-save` inside a batch group: a checkpoint stops training only for a snapshot of the
state; hashing, writing, the commit and retention run on a background thread of the worker.

The worker keeps one saver for all its groups, so the snapshot buffers are allocated once. At
most one save is in flight; a group's end checkpoint is committed before the group returns (the
flow hands its reference on), so the saves in flight there are waited for first. What a
background save did (its commit, its bytes) is recorded on the training thread, between steps.
A background failure is raised on the training thread as the store raised it: a full disk is
fatal for the run, a transient error that outlived the retries fails the task (which is retried),
a lost lease stops the coordinator's work.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

from storage import CheckpointRef
from storage.async_save import AsyncSaver, BackgroundSaveError
from storage.faults import ENV as STORAGE_FAULT_ENV
from storage.store import CheckpointStore, SaveStats
from tasks.jobs import GroupJob, GroupResult
from tasks.worker_cache import WarmTrainer

log = logging.getLogger("rebound.saves")

_saver: AsyncSaver | None = None
_saver_lock = threading.Lock()


def worker_saver() -> AsyncSaver:
    """This worker process's saver (its buffers serve every group it trains)."""
    global _saver
    with _saver_lock:
        if _saver is None:
            _saver = AsyncSaver()
        return _saver


class GroupSaves:
    """One group's background checkpoints."""

    def __init__(self, store: CheckpointStore, job: GroupJob, result: GroupResult,
                 on_commit: Callable[[CheckpointRef, SaveStats], None]) -> None:
        self._store = store
        self._job = job
        self._result = result
        self._on_commit = on_commit
        self._saver = worker_saver()
        self._done: deque[tuple[CheckpointRef, SaveStats]] = deque()
        earlier = self._saver.wait_quietly()  # a save an earlier, failed attempt left in flight
        if earlier is not None:
            log.warning("%s (after its attempt had failed)", earlier)

    def submit(self, warm: WarmTrainer, extra: dict[str, Any]) -> float:
        """Snapshot the trainer's state and save it in the background; returns the stall."""
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
            self._done.append((ref, stats))
            return ref

        try:
            stall = self._saver.submit(f"{run.run_id}@{step}", tensors, write)
        except BackgroundSaveError as err:
            raise _as_raised(err) from None
        finally:
            self.record()
        self._result.ckpt_s += stall
        return stall

    def record(self) -> None:
        """Hand every save committed since the last look to ``on_commit`` (training thread)."""
        while self._done:
            ref, stats = self._done.popleft()
            self._on_commit(ref, stats)

    def poll(self) -> None:
        """Raise a background failure as soon as it is known; record finished saves."""
        try:
            self._saver.poll()
        except BackgroundSaveError as err:
            raise _as_raised(err) from None
        finally:
            self.record()

    def wait(self) -> float:
        """Wait for the save in flight (stall); raise its failure."""
        before = self._saver.stats.wait_s
        try:
            self._saver.wait()
        except BackgroundSaveError as err:
            raise _as_raised(err) from None
        finally:
            self.record()
        waited = self._saver.stats.wait_s - before
        self._result.ckpt_s += waited
        return waited


def _as_raised(err: BackgroundSaveError) -> BaseException:
    """The store's own exception, so the flow classifies it as for a synchronous save."""
    cause = err.__cause__
    return cause if isinstance(cause, Exception) else err


__all__ = ["GroupSaves", "worker_saver"]
