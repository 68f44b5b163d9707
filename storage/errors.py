"""Error classes the orchestration layer reads to decide what to do next.

- ``TransientStoreError``: I/O that may succeed on retry (retry the task).
- ``CorruptCheckpointError``: a checkpoint failed verification (fall back to an older one).
- ``CheckpointNotFoundError``: nothing committed there (start fresh / bad usage).
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of every error the checkpoint store raises on purpose."""


class CheckpointNotFoundError(StoreError, LookupError):
    """No such run or step, or nothing committed for it."""


class TransientStoreError(StoreError):
    """Filesystem I/O failed in a way a retry may fix; nothing was committed."""


class CorruptCheckpointError(StoreError):
    """A committed checkpoint does not verify.

    Attributes:
        run_id: the run the checkpoint belongs to.
        step: the checkpoint's step.
        array: the array (tensor name) at fault, or None when the fault is checkpoint-wide
            (manifest, commit marker).
        chunk: the chunk key within the array (e.g. ``c/2/0``), or None.
        reason: what was wrong, in words.
    """

    def __init__(
        self,
        run_id: str,
        step: int,
        reason: str,
        *,
        array: str | None = None,
        chunk: str | None = None,
    ) -> None:
        self.run_id = run_id
        self.step = step
        self.array = array
        self.chunk = chunk
        self.reason = reason
        where = f"run {run_id!r} step {step}"
        if array is not None:
            where += f" array {array!r}"
        if chunk is not None:
            where += f" chunk {chunk!r}"
        super().__init__(f"corrupt checkpoint: {where}: {reason}")

    def __reduce__(self):  # keep it picklable across process boundaries (Dask/Prefect results)
        return (
            _rebuild_corrupt,
            (self.run_id, self.step, self.reason, self.array, self.chunk),
        )

    def to_dict(self) -> dict:
        """A JSON-able description, used by ``python -m storage verify --json``."""
        return {
            "run_id": self.run_id,
            "step": self.step,
            "array": self.array,
            "chunk": self.chunk,
            "reason": self.reason,
        }


def _rebuild_corrupt(
    run_id: str, step: int, reason: str, array: str | None, chunk: str | None
) -> CorruptCheckpointError:
    return CorruptCheckpointError(run_id, step, reason, array=array, chunk=chunk)
