"""`--async-save` for one rank of a data-parallel group: a checkpoint inside a group stops
training only for the state-hash agreement and a snapshot; each rank writes its own share in
the background and posts its receipt on the group's board (the coordinator's TCPStore); rank
0's background thread waits for every receipt, commits and applies retention.

Why the agreement stays on the training thread: it is a collective (a background thread must
not interleave collectives with the training thread's all_reduce), and it must come before
anything is written, so that a rank whose memory went wrong is caught before its peers keep
theirs warm. What does not need a collective runs behind training: the share (hashing,
writing, fsync), the receipt exchange and the commit.

The group's last checkpoint is committed in line, after every rank has waited for its save in
flight, so a group returns with its end committed, as without --async-save. A save that a
failed attempt leaves in flight is cancelled (rank 0 stops waiting for receipts that will not
come); its shares stay in the staging area for the next save of that step to reuse.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, Protocol

from storage import CheckpointRef, ShareReceipt
from storage.faults import ENV as STORAGE_FAULT_ENV
from storage.hashing import state_hash
from storage.store import CheckpointStore, SaveStats
from tasks.background_saves import BackgroundCommits, settle_previous
from tasks.worker_cache import WarmTrainer
from training.rendezvous import CollectiveError

RECEIPT_POLL_S = 0.01
"""How often rank 0's background thread looks for the receipts still missing (a cheap check
on the coordinator's store; the shares are usually all written by the first look)."""


class Board(Protocol):
    """The part of torch's Store the receipt exchange uses (`RankGroup.board`)."""

    def set(self, key: str, value: str | bytes) -> None: ...
    def get(self, key: str) -> bytes: ...
    def check(self, keys: list[str]) -> bool: ...


class SaveCancelled(RuntimeError):
    """The attempt that started this save failed: its commit is not waited for any more."""


def receipt_key(step: int, rank: int, replica: int = 0) -> str:
    # Replica groups share one board (tasks/replica_board.py): each posts its own receipts.
    return f"share/{step}/{rank}" if replica == 0 else f"share/{step}/{rank}-r{replica}"


def await_receipts(board: Board, step: int, world_size: int, cancel: threading.Event,
                   timeout: timedelta, replica: int = 0) -> list[ShareReceipt]:
    """Every rank's receipt of `step` (of one replica group) from the board, in rank order.

    Raises:
        SaveCancelled: the attempt gave up first.
        CollectiveError: a rank posted none within the collective timeout (it is lost: its
            training thread has failed, or hangs, by now).
    """
    keys = [receipt_key(step, r, replica) for r in range(world_size)]
    deadline = time.monotonic() + timeout.total_seconds()
    while not board.check(keys):
        if cancel.wait(RECEIPT_POLL_S):
            raise SaveCancelled(f"the save of step {step} was cancelled")
        if time.monotonic() > deadline:
            missing = [k for k in keys if not board.check([k])]
            raise CollectiveError(f"no receipt for {', '.join(missing)} within "
                                  f"{timeout.total_seconds():.0f} s")
    return [ShareReceipt.from_json(board.get(k)) for k in keys]


class RankSaves(BackgroundCommits):
    """One rank's background checkpoints inside one group (at most one in flight)."""

    def __init__(self, store: CheckpointStore, *, run_id: str, rank: int, world_size: int,
                 session: str, board: Board, timeout: timedelta, replica: int = 0,
                 commit: Callable[[int, list[ShareReceipt], dict[str, Any]], tuple[CheckpointRef, SaveStats]],
                 on_commit: Callable[[CheckpointRef, SaveStats], None],
                 gather_hashes: Callable[[str], list[str]],
                 disagree: Callable[[int, list[str]], BaseException]) -> None:
        self._store = store
        self._run_id, self._rank, self._world_size = run_id, rank, world_size
        self._session, self._board, self._timeout = session, board, timeout
        self._replica = replica
        super().__init__(on_commit, deque())
        self._commit = commit
        self._gather_hashes, self._disagree = gather_hashes, disagree
        self._cancel = threading.Event()
        self.bytes_written = 0
        self.bytes_reused = 0
        self.waited_at_start_s = settle_previous()

    def submit(self, warm: WarmTrainer, extra: dict[str, Any], meta_extra: dict[str, Any],
               before: Callable[[], None]) -> float:
        """At a checkpoint step inside the group: wait for the save in flight, agree on the
        state hash with every rank, snapshot, and write this rank's share in the background.
        Returns the seconds training stood still. ``before`` runs once the previous save has
        ended (a fault armed for this save must not strike that one)."""
        t0 = time.perf_counter()
        self._settle_in_flight()
        before()
        trainer = warm.trainer
        tensors, meta = trainer.capture(extra)
        meta.update(meta_extra)
        step = trainer.step
        hashes = self._gather_hashes(state_hash(tensors))
        if len(set(hashes)) != 1:
            raise self._disagree(step, hashes)
        write = self._writer(step, hashes[0], meta)
        self._through(lambda: self._saver.submit(f"{self._run_id}@{step}", tensors, write))
        return time.perf_counter() - t0

    def _writer(self, step: int, digest: str, meta: dict[str, Any]
                ) -> Callable[[Mapping[str, Any]], CheckpointRef | None]:
        store, cancel = self._store, self._cancel

        def write(snapshot: Mapping[str, Any]) -> CheckpointRef | None:
            try:
                receipt = store.write_share(self._run_id, step, snapshot, session=self._session,
                                            rank=self._rank, world_size=self._world_size,
                                            state_hash=digest)
            finally:
                os.environ.pop(STORAGE_FAULT_ENV, None)  # an armed fault is for one save only
            self.bytes_written += receipt.bytes_written
            self.bytes_reused += receipt.bytes_reused
            self._board.set(receipt_key(step, self._rank, self._replica), receipt.to_json())
            if self._rank != 0:
                return None
            receipts = await_receipts(self._board, step, self._world_size, cancel, self._timeout,
                                      self._replica)
            ref, stats = self._commit(step, receipts, meta)
            self._done.append((ref, stats))
            return ref

        return write

    def wait(self) -> float:
        """Wait for the save in flight (its failure is raised); returns the seconds waited."""
        return self._settle_in_flight()

    def cancel(self) -> None:
        """The attempt failed: stop waiting for receipts (the next group settles what is left)."""
        self._cancel.set()


__all__ = ["RankSaves", "SaveCancelled", "await_receipts", "receipt_key"]
