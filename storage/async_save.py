"""Saves off the training path: the caller stops only for a snapshot of the state into host
buffers that are allocated once and reused; hashing, writing and the commit run on a
background thread of the same process.

At most one save is in flight: the next ``submit`` first waits for it, and that wait counts as
stall. A background failure is never silent: a transient store error is retried with backoff;
what still fails is raised on the training thread, at the next ``submit``, ``poll`` or
``wait``, as ``BackgroundSaveError`` naming run and step (its cause attached). A process killed
during a background save leaves what any killed save leaves: an uncommitted staging area that
readers never see and whose verified chunks the next save of that step reuses.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from storage.errors import TransientStoreError

T = TypeVar("T")

RETRY_DELAYS_S = (0.5, 1.0, 2.0)


class BackgroundSaveError(RuntimeError):
    """A background save failed after its retries; nothing of it is visible to readers."""

    def __init__(self, label: str, cause: BaseException) -> None:
        super().__init__(f"background save of {label} failed: {cause}")
        self.label = label

    def __reduce__(self) -> tuple:
        return (_rebuild, (str(self), self.label))


def _rebuild(message: str, label: str) -> BackgroundSaveError:
    err = BackgroundSaveError.__new__(BackgroundSaveError)
    RuntimeError.__init__(err, message)
    err.label = label
    return err


@dataclass
class AsyncSaveStats:
    """What the saver cost the training thread, and what ran behind it.

    Attributes:
        saves: saves submitted.
        stall_s: seconds the training thread spent in ``submit`` and ``wait`` (snapshot plus
            waiting for the save in flight).
        wait_s: of ``stall_s``, the part spent waiting for the previous save.
        snapshot_s: of ``stall_s``, the part spent copying the state into the buffers.
        background_s: seconds the background saves ran (hash, write, commit).
        retries: transient failures retried.
    """

    saves: int = 0
    stall_s: float = 0.0
    wait_s: float = 0.0
    snapshot_s: float = 0.0
    background_s: float = 0.0
    retries: int = 0


class SnapshotBuffers:
    """Host copies of named tensors, allocated on first use and reused while shapes and dtypes
    stay the same (pinned when the source is on a GPU, so the copy is a DMA)."""

    def __init__(self) -> None:
        self._held: dict[str, Any] = {}

    def take(self, tensors: Mapping[str, Any]) -> dict[str, Any]:
        """Copy every tensor into its buffer; returns the buffers (valid until the next take)."""
        out: dict[str, Any] = {}
        synchronize: set[Any] = set()
        for name, src in tensors.items():
            buf = self._held.get(name)
            if isinstance(src, np.ndarray):
                if not (isinstance(buf, np.ndarray) and buf.shape == src.shape and buf.dtype == src.dtype):
                    buf = np.empty_like(src, order="C")
                np.copyto(buf, src)
            else:
                buf = self._torch_copy(buf, src, synchronize)
            self._held[name] = out[name] = buf
        for name in set(self._held) - set(tensors):
            del self._held[name]  # a tensor the state no longer has: give its memory back
        if synchronize:
            import torch

            for device in synchronize:
                torch.cuda.synchronize(device)
        return out

    @staticmethod
    def _torch_copy(buf: Any, src: Any, synchronize: set[Any]) -> Any:
        import torch

        src = src.detach()
        fits = isinstance(buf, torch.Tensor) and buf.shape == src.shape and buf.dtype == src.dtype
        if src.is_cuda:
            if not (fits and buf.is_pinned()):
                buf = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            buf.copy_(src, non_blocking=True)
            synchronize.add(src.device)
        else:
            if not fits:
                buf = torch.empty(src.shape, dtype=src.dtype)
            buf.copy_(src)
        return buf


BACKGROUND_NICE = 10
"""The background thread's nice value, above training's: on a machine whose cores all train
(a CPU worker), its hashing and copies take the cycles training leaves, rather than an equal
share. It still runs: a save in flight delays only the next one."""


def _yield_to_training() -> None:
    """Lower this thread's CPU priority (Linux: nice is per thread, and the I/O threads it
    starts inherit it). Elsewhere, or when refused, it runs at normal priority."""
    try:
        current = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), max(current, BACKGROUND_NICE))
    except (AttributeError, OSError):
        pass


class AsyncSaver(Generic[T]):
    """One writer's background saves, at most one in flight."""

    def __init__(self, retry_delays_s: tuple[float, ...] = RETRY_DELAYS_S) -> None:
        self.stats = AsyncSaveStats()
        self._retry_delays_s = retry_delays_s
        self._buffers = SnapshotBuffers()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckpt-async")
        self._in_flight: tuple[str, Future[T]] | None = None
        self._lock = threading.Lock()
        self.last_result: T | None = None

    def prepare(self, tensors: Mapping[str, Any]) -> None:
        """Allocate (and touch) the snapshot buffers for a state of this shape now, so the
        first save does not pay for fresh pages (a first touch runs at a fraction of a copy's
        speed). Only while no save is in flight: the buffers are the snapshot's."""
        if self._in_flight is None:
            self._buffers.take(tensors)

    def submit(self, label: str, tensors: Mapping[str, Any],
               write: Callable[[Mapping[str, Any]], T]) -> float:
        """Snapshot ``tensors`` and run ``write(snapshot)`` in the background; returns the
        seconds this call held the caller up. ``label`` names the save in errors ("run@step").

        Raises:
            BackgroundSaveError: the previous save failed (this one is not started).
        """
        t0 = time.perf_counter()
        self._finish_in_flight()
        waited = time.perf_counter() - t0
        snapshot = self._buffers.take(tensors)
        took = time.perf_counter() - t0
        self._in_flight = (label, self._pool.submit(self._run, write, snapshot))
        self.stats.saves += 1
        self.stats.wait_s += waited
        self.stats.snapshot_s += took - waited
        self.stats.stall_s += took
        return took

    def poll(self) -> T | None:
        """The result of the save in flight once it is done (None while it runs or when there
        is none); raises its failure as ``submit`` does."""
        if self._in_flight is None or not self._in_flight[1].done():
            return None
        return self._finish_in_flight()

    def wait(self) -> T | None:
        """Block until the save in flight is committed; its result (None without one)."""
        t0 = time.perf_counter()
        try:
            return self._finish_in_flight()
        finally:
            self.stats.stall_s += time.perf_counter() - t0
            self.stats.wait_s += time.perf_counter() - t0

    def wait_quietly(self) -> BackgroundSaveError | None:
        """Wait for a save that an earlier, failed caller left in flight; returns its failure
        instead of raising it (that caller's error was already reported)."""
        try:
            self._finish_in_flight()
        except BackgroundSaveError as err:
            return err
        return None

    @property
    def busy(self) -> bool:
        """Whether a save is in flight."""
        return self._in_flight is not None and not self._in_flight[1].done()

    def close(self) -> None:
        """Stop the background thread once the save in flight (if any) has ended; its failure,
        if any, is dropped: call ``wait`` first to see it."""
        self._pool.shutdown(wait=True)

    def _finish_in_flight(self) -> T | None:
        if self._in_flight is None:
            return None
        label, future = self._in_flight
        self._in_flight = None
        try:
            result = future.result()
        except BaseException as err:  # noqa: BLE001 - every failure reaches the caller, named
            raise BackgroundSaveError(label, err) from err
        self.last_result = result
        return result

    def _run(self, write: Callable[[Mapping[str, Any]], T], snapshot: Mapping[str, Any]) -> T:
        t0 = time.perf_counter()
        _yield_to_training()
        try:
            for delay in (*self._retry_delays_s, None):
                try:
                    return write(snapshot)
                except TransientStoreError:
                    if delay is None:
                        raise
                    with self._lock:
                        self.stats.retries += 1
                    time.sleep(delay)
            raise AssertionError("unreachable")
        finally:
            with self._lock:
                self.stats.background_s += time.perf_counter() - t0


__all__ = ["AsyncSaveStats", "AsyncSaver", "BackgroundSaveError", "SnapshotBuffers"]
