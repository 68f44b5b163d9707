"""Background saves (issue 11): the caller stops for a snapshot only; the result is the same
checkpoint a synchronous save writes; a process SIGKILLed mid-save and a store that fails
leave nothing corrupt visible, and a failure always reaches the caller."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from storage_helpers import ROOT, SMALL_CHUNK, env_for_child, numpy_state, small_tmpfs

from storage import open_store
from storage.async_save import AsyncSaver, BackgroundSaveError
from storage.errors import FatalStoreError


def _torch_state(seed: int) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(v.copy()) for k, v in numpy_state(seed).items()}


def test_an_async_save_commits_the_state_at_submit_not_what_training_does_next(tmp_path: Path) -> None:
    sync = open_store(str(tmp_path / "sync"), chunk_bytes=SMALL_CHUNK)
    background = open_store(str(tmp_path / "async"), chunk_bytes=SMALL_CHUNK)
    saver: AsyncSaver = AsyncSaver()
    live = _torch_state(7)
    buffers = None
    try:
        for step in range(1, 4):
            for t in live.values():  # a training step: the live tensors change in place
                t.add_(1)
            expected = sync.save("r", step, live, {"step": step})
            saver.submit(f"r@{step}", live, lambda snap, s=step: background.save("r", s, snap, {"step": s}))
            for t in live.values():  # the next step starts at once, while the save runs
                t.mul_(3)
            assert saver.wait() is not None
            ref = saver.last_result
            assert ref is not None and ref.step == step
            sm, _ = sync.read_manifest("r", step)
            am, _ = background.read_manifest("r", step)
            assert am.state_hash == sm.state_hash, step
            assert expected.step == ref.step
            held = [id(b) for b in saver._buffers._held.values()]
            assert buffers is None or held == buffers  # allocated once, then reused
            buffers = held
    finally:
        saver.close()
    assert saver.stats.saves == 3 and saver.stats.retries == 0
    assert background.verify("r", 3).ok


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_snapshot_of_cuda_tensors_lands_in_reused_pinned_buffers(tmp_path: Path) -> None:
    store = open_store(str(tmp_path), chunk_bytes=SMALL_CHUNK)
    saver: AsyncSaver = AsyncSaver()
    live = {k: v.cuda() for k, v in _torch_state(3).items()}
    held: list[int] | None = None
    try:
        for step in range(1, 3):
            for t in live.values():
                t.add_(1)
            want = {k: v.cpu() for k, v in live.items()}
            saver.submit(f"r@{step}", live, lambda snap, s=step: store.save("r", s, snap, {}))
            for t in live.values():  # training goes on on the GPU while the save runs
                t.mul_(3)
            saver.wait()
            buffers = list(saver._buffers._held.values())
            assert all(b.device.type == "cpu" and b.is_pinned() for b in buffers)
            assert held is None or [id(b) for b in buffers] == held  # allocated once
            held = [id(b) for b in buffers]
            loaded = store.load("r", step).tensors
            for name, tensor in want.items():
                assert torch.equal(loaded[name], tensor), name
    finally:
        saver.close()


def test_at_most_one_save_is_in_flight(tmp_path: Path) -> None:
    store = open_store(str(tmp_path), chunk_bytes=SMALL_CHUNK)
    saver: AsyncSaver = AsyncSaver()
    order: list[str] = []

    def write(snapshot: dict, step: int) -> int:
        order.append(f"start {step}")
        store.save("r", step, snapshot, {})
        order.append(f"end {step}")
        return step

    try:
        for step in (1, 2, 3):
            saver.submit(f"r@{step}", numpy_state(step), lambda snap, s=step: write(snap, s))
        saver.wait()
    finally:
        saver.close()
    assert order == ["start 1", "end 1", "start 2", "end 2", "start 3", "end 3"]
    assert store.steps("r") == [1, 2, 3]


CHILD = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from storage import open_store
    from storage.async_save import AsyncSaver
    from storage_helpers import SMALL_CHUNK, numpy_state
    store = open_store({store!r}, chunk_bytes=SMALL_CHUNK)
    store.save("r", 1, numpy_state(1), {{}})
    saver = AsyncSaver()
    os.environ["REBOUND_STORAGE_FAULT"] = "chunks:5"  # the background thread dies mid-save
    saver.submit("r@2", numpy_state(2), lambda snap: store.save("r", 2, snap, {{}}))
    print("submitted", flush=True)
    saver.wait()
""")


def test_a_process_killed_during_a_background_save_leaves_nothing_visible(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    child = subprocess.run(
        [sys.executable, "-c", CHILD.format(root=str(ROOT), tests=str(ROOT / "tests"), store=url)],
        env=env_for_child(), capture_output=True, text=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr
    assert "submitted" in child.stdout  # the kill came after submit returned: in the background
    store = open_store(url, chunk_bytes=SMALL_CHUNK)
    assert store.steps("r") == [1] and store.verify("r", 1).ok
    staging = [n for n in os.listdir(tmp_path / "store" / "r" / "ckpt") if n.startswith(".staging-")]
    assert staging  # the dead save's chunks, invisible to readers
    saver: AsyncSaver = AsyncSaver()
    try:
        saver.submit("r@2", numpy_state(2), lambda snap: store.save("r", 2, snap, {}))
        ref = saver.wait()
    finally:
        saver.close()
    assert ref is not None and store.verify("r", 2).ok
    assert store.last_save_stats.chunks_reused >= 4  # the dead save's verified chunks


def test_a_background_write_failure_reaches_the_caller_and_commits_nothing(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "full", "1m") as full:
        store = open_store(str(full), chunk_bytes=SMALL_CHUNK)
        store.save("r", 1, numpy_state(1), {})
        big = {"model/huge": np.ones((2 << 20) // 4, dtype=np.float32)}  # 2 MiB: never fits
        saver: AsyncSaver = AsyncSaver(retry_delays_s=(0.01,))
        try:
            saver.submit("r@2", big, lambda snap: store.save("r", 2, snap, {}))
            with pytest.raises(BackgroundSaveError, match=r"r@2.*No space left") as caught:
                saver.wait()
            assert isinstance(caught.value.__cause__, FatalStoreError)
            assert saver.stats.retries == 0  # no retry can free a disk
            # The next save is refused no more: the failure was reported once, then cleared.
            saver.submit("r@3", numpy_state(3), lambda snap: store.save("r", 3, snap, {}))
            assert saver.wait() is not None
        finally:
            saver.close()
        assert store.steps("r") == [1, 3]
        assert store.verify("r", 1).ok and store.verify("r", 3).ok
        assert not [n for n in os.listdir(full / "r" / "ckpt") if n.startswith(".staging-")]
