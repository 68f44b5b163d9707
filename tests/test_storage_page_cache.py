"""A committed checkpoint's chunk files leave the page cache: each save then writes into pages
the kernel hands back at once, not into memory no file used before (storage/localfs.py)."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from pathlib import Path

import numpy as np
import pytest

from storage import open_store

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_PAGE = os.sysconf("SC_PAGE_SIZE")
pytestmark = pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise")


def resident_pages(path: Path) -> tuple[int, int]:
    """(pages of `path` in the page cache, pages of the file), by mincore(2) on a mapping that
    never touches them (a private mapping is read only where it is accessed)."""
    size = path.stat().st_size
    pages = (size + _PAGE - 1) // _PAGE
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mm:
        addr = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        vec = (ctypes.c_ubyte * pages)()
        if _libc.mincore(ctypes.c_void_p(addr), ctypes.c_size_t(size), vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        del addr  # the buffer export must end before the mapping closes
        return sum(b & 1 for b in vec), pages


def big_state(rows: int = 512) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {f"model/w{i}": rng.standard_normal((rows, 512), dtype=np.float32) for i in range(4)}


def chunk_files(step_dir: Path) -> list[Path]:
    return [p for p in step_dir.rglob("*") if p.is_file() and p.stat().st_size >= 256 << 10]


# Chunks of 1 MiB are flushed and dropped by their writer at once under syncfs, chunks of
# 512 KiB after the one syncfs at the end (storage/localfs.py _FLUSH_AT_ONCE_BYTES).
@pytest.mark.parametrize(("durability", "rows"), [("syncfs", 512), ("syncfs", 256),
                                                  ("fsync", 512)])
def test_a_committed_checkpoints_chunks_are_not_kept_in_the_page_cache(
        tmp_path: Path, durability: str, rows: int) -> None:
    store = open_store(str(tmp_path / "store"), durability=durability)
    state = big_state(rows)
    store.save("r", 1, state, {"step": 1})
    files = chunk_files(tmp_path / "store" / "r" / "ckpt")
    assert len(files) == 4
    for f in files:
        cached, pages = resident_pages(f)
        assert pages == rows * 512 * 4 // _PAGE
        assert cached == 0, f"{f.name}: {cached} of {pages} pages still cached"
    # Dropped pages are only the cache: the checkpoint reads back, every chunk verified.
    loaded = store.load("r", 1)
    for name, arr in state.items():
        assert np.array_equal(np.asarray(loaded.tensors[name]), arr)


def test_the_page_cache_check_sees_a_file_just_written(tmp_path: Path) -> None:
    """The check above can fail: a file written without the store stays cached."""
    f = tmp_path / "plain.bin"
    f.write_bytes(os.urandom(1 << 20))
    cached, pages = resident_pages(f)
    assert pages == 256 and cached == pages
