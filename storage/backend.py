"""The narrow interface between checkpoint logic and a filesystem, plus the shared I/O loops.

Two implementations: ``localfs.LocalBackend`` (staging folder + fsync + atomic rename) and
``fsspecfs.FsspecBackend`` (staging prefix, copy, marker last). Paths are relative to the store
root and use '/'.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Protocol

# Bytes per hash+write step: small enough that a block hashed is still in cache when written.
BLOCK_BYTES = 4 << 20
_ZEROS: memoryview | None = None


def zeros(n: int) -> memoryview:
    """A read-only view of ``n`` zero bytes (n <= BLOCK_BYTES), from one shared buffer."""
    global _ZEROS
    if _ZEROS is None:
        _ZEROS = memoryview(bytes(BLOCK_BYTES))
    return _ZEROS[:n]


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> object: ...


class ChunkSizeError(Exception):
    """A chunk file is longer or shorter than the manifest says."""

    def __init__(self, actual: int, expected: int) -> None:
        super().__init__(f"chunk file has {actual} bytes, expected {expected}")
        self.actual = actual
        self.expected = expected


def write_blocks(
    write: Callable[[memoryview], int],
    data: memoryview,
    pad: int,
    hashers: Sequence[Hasher],
    data_hashers: Sequence[Hasher],
) -> int:
    """Write ``data`` then ``pad`` zero bytes, hashing each block as it goes out.

    ``hashers`` see every stored byte (the chunk hash); ``data_hashers`` only the tensor's
    bytes (the state hash). ``write`` may write less than asked (like os.write).
    """
    total = 0
    for src, feed_data in ((data, True), (None, False)):
        n = len(src) if src is not None else pad
        off = 0
        while off < n:
            blk = src[off : off + BLOCK_BYTES] if src is not None else zeros(min(BLOCK_BYTES, n - off))
            for h in hashers:
                h.update(blk)
            if feed_data:
                for h in data_hashers:
                    h.update(blk)
            done = 0
            while done < len(blk):
                done += write(blk[done:])
            off += len(blk)
            total += len(blk)
    return total


def read_blocks(
    readinto: Callable[[memoryview], int],
    nbytes: int,
    data_nbytes: int,
    dest: memoryview | None,
    hashers: Sequence[Hasher],
    data_hashers: Sequence[Hasher],
) -> None:
    """Read a chunk of ``nbytes`` (the first ``data_nbytes`` into ``dest`` when given).

    Raises ChunkSizeError when the file ends early or has bytes beyond ``nbytes``.
    """
    scratch: memoryview | None = None
    off = 0
    while off < nbytes:
        want = min(BLOCK_BYTES, nbytes - off)
        if dest is not None and off < data_nbytes:
            want = min(want, data_nbytes - off)
            blk = dest[off : off + want]
        else:
            if scratch is None:
                scratch = memoryview(bytearray(min(BLOCK_BYTES, nbytes)))
            blk = scratch[:want]
        got = 0
        while got < want:
            n = readinto(blk[got:])
            if not n:
                raise ChunkSizeError(off + got, nbytes)
            got += n
        for h in hashers:
            h.update(blk)
        if off < data_nbytes:
            for h in data_hashers:
                h.update(blk[: max(0, min(want, data_nbytes - off))])
        off += want
    probe = bytearray(1)
    if readinto(memoryview(probe)):
        raise ChunkSizeError(nbytes + 1, nbytes)


class Staging(Protocol):
    """A private place one writer fills before committing it as a step."""

    path: str

    def write_chunk(
        self, relpath: str, data: memoryview, pad: int,
        hashers: Sequence[Hasher], data_hashers: Sequence[Hasher],
    ) -> int:
        """Write one chunk file (data + zero padding); returns bytes written."""
        ...

    def write_file(self, relpath: str, data: bytes) -> None:
        """Write a small file (zarr.json, manifest)."""
        ...

    def adopt(self, relpath: str, src: str) -> None:
        """Take an already-written, verified file from another staging (link or copy)."""
        ...

    def make_durable(self) -> None:
        """Make everything written so far durable."""
        ...

    def commit(
        self, final: str, marker_name: str, marker: bytes, files: Sequence[str] | None = None,
        fence: Callable[[], None] | None = None,
    ) -> bool:
        """Publish as ``final`` with the commit marker; False when another commit won.

        ``files`` (relative paths) are what a shared staging holds for this checkpoint: other
        processes wrote most of them, so this handle cannot know them itself. ``fence`` (the
        lease check, ``storage.lease``) runs under the commit's lock right before the commit
        becomes visible; when it raises, nothing is published."""
        ...

    def discard(self) -> None:
        """Remove the staging (best effort)."""
        ...

    def abandon(self) -> None:
        """Stop writing but keep the files, so a retry of the step can reuse them."""
        ...


class Backend(Protocol):
    """File operations the store needs."""

    url: str
    # True: commit is one atomic rename, so a step folder without a marker is damage, not a
    # write in flight.
    atomic_commit: bool

    def list_dir(self, path: str) -> list[str]: ...
    def exists(self, path: str) -> bool:
        """False only when the path is absent; any other failure raises (OSError)."""
        ...
    def step_lock(
        self, path: str, give_up: Callable[[], bool] | None = None
    ) -> AbstractContextManager[bool]:
        """Be the only writer committing or removing ``path`` inside the ``with`` (True), or
        False when ``give_up()`` turned true while waiting."""
        ...
    def size(self, path: str) -> int | None: ...
    def sharers(self, path: str) -> int:
        """How many names share the bytes of the file at ``path`` (hard links on a local disk;
        1 where an adopted file is a copy), so incremental saves can cap what one rotten file
        takes with it. A local disk answers 0 for an absent file; a remote store answers 1
        without asking (the verified read before any reuse finds it missing)."""
        ...
    def list_files(self, path: str) -> list[str]:
        """Every file under ``path``, at any depth, relative to it ('/'-separated)."""
        ...
    def read_bytes(self, path: str) -> bytes: ...
    def read_chunk(
        self, path: str, nbytes: int, data_nbytes: int, dest: memoryview | None,
        hashers: Sequence[Hasher], data_hashers: Sequence[Hasher] = (),
    ) -> None: ...
    def write_atomic(self, path: str, data: bytes) -> None: ...
    def create_exclusive(self, path: str, data: bytes) -> bool: ...
    def remove_tree(self, path: str) -> None: ...
    def begin_staging(self, parent: str, prefix: str) -> Staging | None:
        """A private place for one save; None when the step got committed by another writer
        while this one waited to write it (S3, whose saves write the step's keys directly)."""
        ...
    def join_staging(self, parent: str, name: str, exclusive: bool = False) -> Staging:
        """Open (creating if needed) the staging ``name`` that several writers fill together
        (sharded saves): files written through it replace any file already at that path.
        ``exclusive`` (the committer): wait, within a bound, until no other writer is in it."""
        ...
    def stale_stagings(self, parent: str, prefix: str) -> list[str]: ...
    def durability(self) -> str: ...
