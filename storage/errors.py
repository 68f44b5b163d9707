"""Error classes the orchestration layer reads to decide what to do next.

- ``TransientStoreError``: I/O that may succeed on retry (retry the task).
- ``FatalStoreError``: the storage refuses in a way no retry can fix (full disk, read-only,
  permission denied): fail at once with its one-line message.
- ``CorruptCheckpointError``: a checkpoint failed verification (fall back to an older one).
- ``CheckpointNotFoundError``: nothing committed there (start fresh / bad usage).
"""

from __future__ import annotations

import errno as _errno
import os


class StoreError(Exception):
    """Base class of every error the checkpoint store raises on purpose."""


class CheckpointNotFoundError(StoreError, LookupError):
    """No such run or step, or nothing committed for it."""


class TransientStoreError(StoreError):
    """Filesystem I/O failed in a way a retry may fix; nothing was committed."""


class FatalStoreError(StoreError):
    """The storage refuses in a way no retry can fix (ENOSPC, EROFS, EACCES, EPERM, EDQUOT).

    Attributes:
        url: the store.
        errno_name: the error's symbolic name, e.g. ``"ENOSPC"``.
        strerror: the system's words for it, e.g. ``"No space left on device"``.
    """

    def __init__(self, url: str, errno_name: str, strerror: str) -> None:
        self.url = url
        self.errno_name = errno_name
        self.strerror = strerror
        super().__init__(f"store {url}: {strerror} ({errno_name})")

    def __reduce__(self):  # picklable across process boundaries (Dask/Prefect results)
        return (FatalStoreError, (self.url, self.errno_name, self.strerror))


# Errors a retry cannot fix: the disk stays full, the mount read-only, the permission missing.
_FATAL_ERRNOS = frozenset(
    getattr(_errno, name) for name in ("ENOSPC", "EROFS", "EACCES", "EPERM", "EDQUOT") if hasattr(_errno, name)
)


def classify_os_error(err: OSError, url: str, what: str | None = None) -> StoreError:
    """The store error an OSError stands for: FatalStoreError or TransientStoreError.

    Args:
        err: what the filesystem raised.
        url: the store, named in a fatal error's message.
        what: what was being done (``"saving r@3"``), the prefix of a transient error's message;
            defaults to ``store <url>``.
    """
    code = err.errno
    if code in _FATAL_ERRNOS:
        strerror = err.strerror or os.strerror(code)
        return FatalStoreError(url, _errno.errorcode.get(code, str(code)), strerror)
    return TransientStoreError(f"{what or f'store {url}'}: {err}")


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
