"""An error reading the store is an error, never "absent" (issue 7, point 8).

The store runs on a real filesystem whose reads of commit markers time out while a switch is
on (a small fsspec filesystem over the local one): a committed step must not vanish from
``steps()``, resume must not silently pick an older step, and a re-save must not overwrite the
committed step in place.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fsspec
import pytest
from fsspec.implementations.local import LocalFileSystem
from storage_helpers import SMALL_CHUNK, assert_same_tensors, numpy_state

from storage import CheckpointStore, TransientStoreError, open_store
from storage.fsspecfs import FsspecBackend

PROTOCOL = "stallmarkers"


class StallingMarkers(LocalFileSystem):
    """The local filesystem, except that touching a commit marker times out while ``stall``."""

    protocol = (PROTOCOL,)
    stall = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("auto_mkdir", True)
        super().__init__(*args, **kwargs)

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, str) and path.startswith(f"{PROTOCOL}://"):
            path = path[len(PROTOCOL) + 3:]
        return super()._strip_protocol(path)

    def _check(self, path: Any) -> None:
        if type(self).stall and str(path).endswith("/COMMITTED"):
            raise TimeoutError(f"read timed out: {path}")

    def info(self, path: Any, **kwargs: Any) -> dict:
        self._check(path)
        return super().info(path, **kwargs)

    def cat_file(self, path: Any, *args: Any, **kwargs: Any) -> bytes:
        self._check(path)
        return super().cat_file(path, *args, **kwargs)

    def _open(self, path: Any, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        self._check(path)
        return super()._open(path, mode, *args, **kwargs)


fsspec.register_implementation(PROTOCOL, StallingMarkers, clobber=True)


@pytest.fixture
def store(tmp_path: Path) -> CheckpointStore:
    StallingMarkers.stall = False
    url = f"{PROTOCOL}://{tmp_path / 'store'}"
    s = CheckpointStore(FsspecBackend(url), open_store("memory://unused", chunk_bytes=SMALL_CHUNK).config)
    s.save("r", 1, numpy_state(1), {"step": 1})
    s.save("r", 2, numpy_state(2), {"step": 2})
    yield s
    StallingMarkers.stall = False


def test_a_marker_read_timeout_is_an_error_not_a_missing_step(store: CheckpointStore) -> None:
    StallingMarkers.stall = True
    with pytest.raises(TransientStoreError, match="timed out"):
        store.steps("r")
    with pytest.raises(TransientStoreError, match="timed out"):
        store.load_latest_verified("r")  # not step 1 as if step 2 were gone
    with pytest.raises(TransientStoreError, match="timed out"):
        store.latest_verified_ref("r")
    StallingMarkers.stall = False
    assert store.steps("r") == [1, 2]


def test_a_resave_during_a_marker_timeout_does_not_overwrite_the_committed_step(
    store: CheckpointStore, tmp_path: Path
) -> None:
    step_dir = tmp_path / "store" / "r" / "ckpt" / "000000000002"
    before = {p.relative_to(step_dir): p.read_bytes() for p in step_dir.rglob("*") if p.is_file()}
    ref = store.ref("r", 2)
    StallingMarkers.stall = True
    with pytest.raises(TransientStoreError, match="timed out"):
        store.save("r", 2, numpy_state(99), {"step": 2, "other": True})
    StallingMarkers.stall = False
    after = {p.relative_to(step_dir): p.read_bytes() for p in step_dir.rglob("*") if p.is_file()}
    assert after == before
    assert store.ref("r", 2) == ref and store.verify("r", 2).ok
    assert_same_tensors(store.load("r", 2).tensors, numpy_state(2))
    # Once the store answers again, a re-save returns the committed step, unchanged.
    assert store.save("r", 2, numpy_state(99), {"step": 2, "other": True}) == ref
    assert store.last_save_stats.outcome == "existing"
