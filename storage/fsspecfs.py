"""fsspec backend (``memory://`` in tests, object stores such as ``s3://`` as an extra).

Object stores have no rename, so a writer stages under ``<run>/ckpt/.staging-<step>-<uuid>/``,
then copies every file to ``<run>/ckpt/<step>/`` and writes the COMMITTED marker **last**;
readers only trust steps that have a marker. Without a conditional put, "exactly one winner" rests
on checking that no marker exists before copying and re-reading the marker after writing it:
two writers racing inside that window can interleave files, but the marker then names one
manifest and any chunk that is not that manifest's fails verification, so a reader sees a
corrupt checkpoint (and falls back), never a silent mixture.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from datetime import timedelta

import fsspec

from storage.backend import ChunkSizeError, Hasher, read_blocks, write_blocks

_STARTED = ".started"


class FsspecStaging:
    """A staging prefix on an fsspec filesystem."""

    def __init__(self, backend: FsspecBackend, rel: str) -> None:
        self._b = backend
        self.path = rel
        self._files: list[str] = []  # list.append is atomic: safe from several I/O threads
        backend.fs.pipe_file(backend.p(f"{rel}/{_STARTED}"), json.dumps({"unix": time.time()}).encode())

    def write_chunk(
        self, relpath: str, data: memoryview, pad: int,
        hashers: Sequence[Hasher], data_hashers: Sequence[Hasher],
    ) -> int:
        self._files.append(relpath)
        with self._b.fs.open(self._b.p(f"{self.path}/{relpath}"), "wb") as f:
            return write_blocks(f.write, data, pad, hashers, data_hashers)

    def write_file(self, relpath: str, data: bytes) -> None:
        self._files.append(relpath)
        self._b.fs.pipe_file(self._b.p(f"{self.path}/{relpath}"), bytes(data))

    def adopt(self, relpath: str, src: str) -> None:
        self._files.append(relpath)
        self._b.fs.copy(self._b.p(src), self._b.p(f"{self.path}/{relpath}"))

    def make_durable(self) -> None:
        pass  # a completed put is durable on an object store

    def commit(self, final: str, marker_name: str, marker: bytes) -> bool:
        fs, p = self._b.fs, self._b.p
        marker_path = p(f"{final}/{marker_name}")
        if fs.exists(marker_path):
            return False
        for rel in self._files:
            fs.copy(p(f"{self.path}/{rel}"), p(f"{final}/{rel}"))
        if fs.exists(marker_path):  # someone committed while we copied
            return False
        fs.pipe_file(marker_path, marker)
        won = fs.cat_file(marker_path) == marker
        self.discard()
        return won

    def abandon(self) -> None:
        pass

    def discard(self) -> None:
        try:
            self._b.fs.rm(self._b.p(self.path), recursive=True)
        except FileNotFoundError:
            pass


class FsspecBackend:
    """Checkpoint files on any fsspec filesystem."""

    atomic_commit = False

    def __init__(self, url: str, stale_after: timedelta = timedelta(hours=1)) -> None:
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = root.rstrip("/")
        self._stale_s = stale_after.total_seconds()

    def durability(self) -> str:
        return "object-store"

    def p(self, path: str) -> str:
        return f"{self.root}/{path}" if path else self.root

    def list_dir(self, path: str) -> list[str]:
        try:
            entries = self.fs.ls(self.p(path), detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        base = self.p(path).rstrip("/")
        return sorted(e.rstrip("/").rsplit("/", 1)[-1] for e in entries if e.rstrip("/") != base)

    def exists(self, path: str) -> bool:
        return bool(self.fs.exists(self.p(path)))

    def size(self, path: str) -> int | None:
        try:
            info = self.fs.info(self.p(path))
        except FileNotFoundError:
            return None
        return int(info["size"]) if info.get("type") == "file" else None

    def read_bytes(self, path: str) -> bytes:
        return self.fs.cat_file(self.p(path))

    def read_chunk(
        self, path: str, nbytes: int, data_nbytes: int, dest: memoryview | None,
        hashers: Sequence[Hasher], data_hashers: Sequence[Hasher] = (),
    ) -> None:
        size = self.size(path)
        if size is None:
            raise FileNotFoundError(path)
        if size != nbytes:
            raise ChunkSizeError(size, nbytes)
        with self.fs.open(self.p(path), "rb") as f:
            read_blocks(f.readinto, nbytes, data_nbytes, dest, hashers, data_hashers)

    def write_atomic(self, path: str, data: bytes) -> None:
        self.fs.pipe_file(self.p(path), bytes(data))  # a single put is atomic on object stores

    def create_exclusive(self, path: str, data: bytes) -> bool:
        # No conditional put in plain fsspec: check then put (a race can let two callers win).
        if self.fs.exists(self.p(path)):
            return False
        self.fs.pipe_file(self.p(path), bytes(data))
        return True

    def remove_tree(self, path: str) -> None:
        try:
            self.fs.rm(self.p(path), recursive=True)
        except FileNotFoundError:
            pass

    def begin_staging(self, parent: str, prefix: str) -> FsspecStaging:
        return FsspecStaging(self, f"{parent}/{prefix}{uuid.uuid4().hex}")

    def stale_stagings(self, parent: str, prefix: str) -> list[str]:
        """Staging prefixes older than the stale age (object stores have no locks)."""
        out = []
        now = time.time()
        for name in self.list_dir(parent):
            if not name.startswith(prefix):
                continue
            rel = f"{parent}/{name}"
            try:
                started = json.loads(self.read_bytes(f"{rel}/{_STARTED}"))["unix"]
            except (FileNotFoundError, ValueError, KeyError, TypeError):
                started = 0.0
            if now - float(started) >= self._stale_s:
                out.append(rel)
        return out
