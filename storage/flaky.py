"""`flaky://PATH`: the real local filesystem, with checkpoint writes that fail now and then.

A fire drill for storage: every write of a file under a `ckpt/` folder raises OSError(EIO) with
probability REBOUND_FLAKY_P (default 0.1), drawn from a generator seeded by REBOUND_FLAKY_SEED
(default 0) and the process id; REBOUND_FLAKY_FIRST=K instead fails exactly the first K such
writes of each process (a short outage, deterministic for tests). Reads, run documents and everything else pass through untouched,
so what fails is exactly what a flaky disk or object store does to a checkpoint save.
"""

from __future__ import annotations

import errno
import os
import random
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

PROTOCOL = "flaky"


class FlakyFileSystem(LocalFileSystem):
    """LocalFileSystem whose checkpoint writes fail with a set probability."""

    protocol = (PROTOCOL,)
    # fsspec caches instances by their arguments: a cached one would keep the failure settings
    # of whoever made it first, whatever the environment says now.
    cachable = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("auto_mkdir", True)
        super().__init__(*args, **kwargs)
        self.fail_first = int(os.environ.get("REBOUND_FLAKY_FIRST", "0"))
        self.fail_p = float(os.environ.get("REBOUND_FLAKY_P", "0" if self.fail_first else "0.1"))
        self._writes = 0
        seed = int(os.environ.get("REBOUND_FLAKY_SEED", "0"))
        self._rng = random.Random(f"{seed}:{os.getpid()}")
        self.injected = 0

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, str) and path.startswith(f"{PROTOCOL}://"):
            path = path[len(PROTOCOL) + 3:]
        return super()._strip_protocol(path)

    def _maybe_fail(self, path: str, op: str) -> None:
        if "/ckpt/" not in str(path):
            return
        self._writes += 1
        if self._writes <= self.fail_first or self._rng.random() < self.fail_p:
            self.injected += 1
            raise OSError(errno.EIO, f"flaky storage: injected {op} failure", str(path))

    def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        if any(flag in mode for flag in "wax+"):
            self._maybe_fail(path, "write")
        return super()._open(path, mode, *args, **kwargs)

    def pipe_file(self, path: str, value: bytes, *args: Any, **kwargs: Any) -> None:
        self._maybe_fail(path, "write")
        super().pipe_file(path, value, *args, **kwargs)

    def cp_file(self, path1: str, path2: str, *args: Any, **kwargs: Any) -> None:
        self._maybe_fail(path2, "copy")
        super().cp_file(path1, path2, *args, **kwargs)


fsspec.register_implementation(PROTOCOL, FlakyFileSystem, clobber=True)
