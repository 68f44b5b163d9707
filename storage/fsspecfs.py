"""fsspec backend (``memory://`` in tests, object stores such as ``s3://`` as an extra).

Object stores have no rename, so a writer stages under ``<run>/ckpt/.staging-<step>-<uuid>/``,
then copies every file to ``<run>/ckpt/<step>/`` and writes the COMMITTED marker **last**;
readers only trust steps that have a marker.

Plain fsspec offers no atomic create-if-absent (no conditional put), so "exactly one commit
wins" cannot rest on one object. A writer first takes a claim on the step (``storage.claims``:
its own uniquely named claim object, then a listing that must show no other live claim), and
only the claim holder checks that no marker exists, copies into the step folder and writes the
marker; the claim goes after the marker. A loser therefore never writes a file of the winner's
step. This needs read-after-write and list-after-write consistency (local files, ``memory://``,
S3); on a store without it, concurrent writers of one step are not safe. A read error is an
error here, never "absent": ``exists`` lets everything but FileNotFoundError through.
"""

from __future__ import annotations

import errno
import json
import time
import uuid
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from datetime import timedelta

import fsspec

from storage import faults
from storage.backend import ChunkSizeError, Hasher, read_blocks, write_blocks
from storage.claims import Claims

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
        if src != f"{self.path}/{relpath}":  # else: a file already here (shared staging) is kept
            self._b.fs.copy(self._b.p(src), self._b.p(f"{self.path}/{relpath}"))

    def make_durable(self) -> None:
        pass  # a completed put is durable on an object store

    def commit(
        self, final: str, marker_name: str, marker: bytes, files: Sequence[str] | None = None,
        fence: Callable[[], None] | None = None,
    ) -> bool:
        b = self._b
        marker_path = f"{final}/{marker_name}"
        with b.step_lock(final, give_up=lambda: b.exists(marker_path)) as held:
            if not held or b.exists(marker_path):
                return False  # another writer committed this step: its files stay untouched
            if fence is not None:
                fence()  # refuse before copying anything
            if b.exists(final):
                b.remove_tree(final)  # a dead claimer's partial copy: nobody else writes here now
            for i, rel in enumerate(self._files if files is None else files):
                b.fs.copy(b.p(f"{self.path}/{rel}"), b.p(f"{final}/{rel}"))
                if i == 0:
                    faults.point("mid-copy")
            if fence is not None:
                try:
                    fence()  # again right before the marker: the copy may have taken long
                except BaseException:
                    b.remove_tree(final)  # our copy, never marked: we still hold the claim
                    raise
            b.fs.pipe_file(b.p(marker_path), marker)
            won = b.read_bytes(marker_path) == marker  # a store that broke the claim's promise
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

    def __init__(self, url: str, stale_after: timedelta = timedelta(hours=1), **storage_options: object) -> None:
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.root = root.rstrip("/")
        self._stale_s = stale_after.total_seconds()
        self._claims = Claims(self, stale_after)

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
        # Not fs.exists(): it answers False for *any* exception, so a timeout reading a marker
        # would make a committed step look absent.
        try:
            self.fs.info(self.p(path))
        except FileNotFoundError:
            return False
        except OSError:
            raise
        except Exception as e:  # e.g. a client library's own timeout class
            raise OSError(errno.EIO, f"{type(e).__name__}: {e}") from e
        return True

    def step_lock(
        self, path: str, give_up: Callable[[], bool] | None = None
    ) -> AbstractContextManager[bool]:
        """Hold the only live claim on ``path`` (see the module doc); False if ``give_up()``."""
        return self._claims.hold(path, give_up)

    def size(self, path: str) -> int | None:
        try:
            info = self.fs.info(self.p(path))
        except FileNotFoundError:
            return None
        return int(info["size"]) if info.get("type") == "file" else None

    def sharers(self, path: str) -> int:
        # An adopted object is a server-side copy: rot in one never reaches another. Answered
        # without a request per chunk: a missing object fails the verified read before a copy.
        return 1

    def list_files(self, path: str) -> list[str]:
        base = self.p(path).rstrip("/")
        found = self.fs.find(base)
        return sorted(f.rstrip("/")[len(base) + 1:] for f in found if f.rstrip("/").startswith(base + "/"))

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
        # No conditional put in plain fsspec: check then put, under a claim on the path.
        with self.step_lock(path, give_up=lambda: self.exists(path)) as held:
            if not held or self.exists(path):
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

    def join_staging(self, parent: str, name: str, exclusive: bool = False) -> FsspecStaging:
        # Puts replace objects, so a shared prefix needs nothing special; each writer's
        # ".started" refreshes the age that cleanup goes by. No locks here: two committers of
        # one session write the same bytes (see storage.shards), and the step claim picks one.
        return FsspecStaging(self, f"{parent}/{name}")

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
