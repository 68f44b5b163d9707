"""A writer SIGKILLed at any point, two writers racing, I/O errors: committed data is never
touched, half-written data is never visible, and a retry reuses what was already written."""

from __future__ import annotations

import errno
import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from storage_helpers import (
    ROOT,
    SMALL_CHUNK,
    assert_same_tensors,
    chunks_under,
    env_for_child,
    flip_byte,
    numpy_state,
    start_writer,
    step_path,
)

import storage.localfs as localfs
from storage import TransientStoreError, open_store

RUN = "r"


def _store(root: Path, **kw):
    return open_store(str(root), chunk_bytes=SMALL_CHUNK, staging_grace=kw.pop("staging_grace", _zero()), **kw)


def _zero():
    from datetime import timedelta

    return timedelta(0)


def _stagings(root: Path) -> list[Path]:
    return sorted((root / RUN / "ckpt").glob(".staging-*"))


def _snapshot(root: Path, step: int) -> dict[str, bytes]:
    base = step_path(root, RUN, step)
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in base.rglob("*") if p.is_file()}


@pytest.mark.parametrize("fault", ["chunks:1", "chunks:5", "before-manifest", "before-rename", "after-rename"])
def test_sigkill_during_save_then_retry(tmp_path: Path, fault: str) -> None:
    store = _store(tmp_path)
    store.save(RUN, 1, numpy_state(1), {"step": 1})
    before = _snapshot(tmp_path, 1)

    proc = start_writer(str(tmp_path), RUN, 2, seed=2, REBOUND_STORAGE_FAULT=fault)
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL

    assert _snapshot(tmp_path, 1) == before  # the committed checkpoint is untouched
    if fault == "after-rename":
        assert store.steps(RUN) == [1, 2]  # published before the kill: complete and verified
        assert store.verify(RUN, 2).ok
    else:
        assert store.steps(RUN) == [1]  # the half-written one is invisible
        assert not step_path(tmp_path, RUN, 2).exists()
        assert store.load_latest_verified(RUN).ref.step == 1
        assert len(_stagings(tmp_path)) == 1

    state = numpy_state(2)
    store.save(RUN, 2, state, {"step": 2})
    stats = store.last_save_stats
    total = sum(a.nbytes for a in state.values())
    manifest, _ = store.read_manifest(RUN, 2)
    if fault == "after-rename":
        assert stats.outcome == "existing" and stats.bytes_written == 0
    else:
        n = manifest.arrays and sum(len(a.layout.chunks) for a in manifest.arrays)
        assert stats.outcome == "committed"
        assert stats.bytes_written + stats.bytes_reused == manifest.nbytes
        if fault.startswith("chunks:"):
            killed_after = int(fault.split(":")[1])
            assert stats.chunks_reused >= killed_after  # every chunk finished before the kill
            assert stats.bytes_written < manifest.nbytes
        else:  # every chunk was written before the kill: nothing is written again
            assert stats.chunks_reused == n and stats.bytes_written == 0
    assert_same_tensors(store.load(RUN, 2).tensors, state)
    assert total <= manifest.nbytes
    store.gc(RUN, keep_last=5)
    assert _stagings(tmp_path) == []  # the dead writer's staging is cleaned up


def test_retry_reuses_only_chunks_whose_size_and_hash_match(tmp_path: Path) -> None:
    store = _store(tmp_path)
    proc = start_writer(str(tmp_path), RUN, 3, seed=3, REBOUND_STORAGE_FAULT="before-rename")
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    (stale,) = _stagings(tmp_path)
    chunks = [p for p in chunks_under(stale) if p.stat().st_size > 8]
    flip_byte(chunks[0], 100)                              # same size, wrong hash
    chunks[1].write_bytes(chunks[1].read_bytes()[:-1])     # wrong size
    state = numpy_state(3)
    store.save(RUN, 3, state, {})
    stats = store.last_save_stats
    assert stats.chunks_written == 2
    assert stats.bytes_written == chunks[0].stat().st_size + chunks[1].stat().st_size + 1
    assert stats.chunks_reused == len(chunks_under(stale)) - 2
    assert_same_tensors(store.load(RUN, 3).tensors, state)


def test_two_processes_saving_the_same_step_commit_exactly_once(tmp_path: Path) -> None:
    barrier = tmp_path / "barrier"
    env = {"REBOUND_STORAGE_FAULT": f"barrier:before-rename:{barrier}:2"}
    procs = [start_writer(str(tmp_path), RUN, 7, seed=s, **env) for s in (10, 11)]
    outs = [p.communicate(timeout=60) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    results = [json.loads(o[0]) for o in outs]
    assert results[0]["ref"] == results[1]["ref"]  # the loser returns the winner's ref
    assert sorted(r["outcome"] for r in results) == ["committed", "lost-race"]
    store = _store(tmp_path)
    assert store.steps(RUN) == [7]
    assert _stagings(tmp_path) == []
    got = store.load(RUN, 7).tensors
    winner_seed = int(got["optim/state/0/step"].item())
    assert winner_seed in (10, 11)
    assert_same_tensors(got, numpy_state(winner_seed))  # all of one writer, none of the other


def test_io_error_during_save_is_transient_and_commits_nothing(tmp_path: Path, monkeypatch) -> None:
    store = _store(tmp_path)
    state = numpy_state(4)
    calls = {"n": 0}
    real = localfs._write_all

    def failing(fd: int, data: memoryview) -> int:
        calls["n"] += 1
        if calls["n"] == 6:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, data)

    monkeypatch.setattr(localfs, "_write_all", failing)
    with pytest.raises(TransientStoreError, match="Input/output error"):
        store.save(RUN, 4, state, {})
    assert store.steps(RUN) == []
    monkeypatch.setattr(localfs, "_write_all", real)
    store.save(RUN, 4, state, {})
    assert store.last_save_stats.chunks_reused >= 1  # the retry picked up what was written
    assert_same_tensors(store.load(RUN, 4).tensors, state)


def test_live_writers_staging_is_not_cleaned_up(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.save(RUN, 1, numpy_state(1), {})
    live = store.backend.begin_staging(f"{RUN}/ckpt", ".staging-000000000002-")
    try:
        assert store.clean_staging(RUN) == []
        assert len(_stagings(tmp_path)) == 1
    finally:
        live.abandon()
    assert len(store.clean_staging(RUN)) == 1
    assert _stagings(tmp_path) == []


def test_per_file_fsync_durability_mode(tmp_path: Path) -> None:
    store = _store(tmp_path, durability="fsync")
    state = {"a": np.arange(50_000, dtype=np.float32)}
    store.save(RUN, 1, state, {})
    assert store.last_save_stats.durability == "fsync"
    assert_same_tensors(store.load(RUN, 1).tensors, state)


def test_a_commit_landing_while_a_writer_looks_is_not_deleted(tmp_path: Path) -> None:
    """Issue 7 point 9: writer A finds no marker for step 8; writer B commits step 8 right then;
    A must not take B's fresh commit for a markerless folder and delete it."""
    barrier = tmp_path / "barrier"
    a = start_writer(str(tmp_path), RUN, 8, seed=20, REBOUND_STORAGE_FAULT=f"barrier:existing-no-marker:{barrier}:2")
    b = None
    try:
        deadline = time.monotonic() + 30
        while not (barrier.is_dir() and any(barrier.iterdir())):  # A is waiting between its checks
            assert a.poll() is None and time.monotonic() < deadline, a.communicate()
            time.sleep(0.01)
        b = start_writer(str(tmp_path), RUN, 8, seed=21, REBOUND_STORAGE_FAULT=f"barrier:after-rename:{barrier}:2")
        outs = [p.communicate(timeout=60) for p in (a, b)]
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert [a.returncode, b.returncode] == [0, 0], [o[1] for o in outs]
    res_a, res_b = (json.loads(o[0]) for o in outs)
    assert res_b["outcome"] == "committed" and res_a["outcome"] == "existing"
    assert res_a["ref"] == res_b["ref"]
    store = _store(tmp_path)
    assert store.ref(RUN, 8).to_dict() == res_b["ref"]
    assert_same_tensors(store.load(RUN, 8).tensors, numpy_state(21))


def test_first_checkpoint_of_a_run_fsyncs_the_new_folders_parents(tmp_path: Path) -> None:
    """Issue 7 point 13: in fsync mode the first save of a run creates the store, run and ckpt
    folders; each new folder's entry is made durable in its parent (observed with strace)."""
    import shutil
    import subprocess
    import sys

    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed")
    root = tmp_path / "store"
    log = tmp_path / "fsync.log"
    code = (
        "import sys; from storage import open_store; from storage_helpers import numpy_state; "
        f"open_store({str(root)!r}, durability='fsync').save('r', 1, numpy_state(1), {{}})"
    )
    res = subprocess.run(
        [strace, "-f", "-y", "-e", "trace=fsync", "-o", str(log), sys.executable, "-c", code],
        cwd=ROOT, env=env_for_child(PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}"), capture_output=True,
        text=True, timeout=120,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    synced = {
        line.split("<", 1)[1].split(">", 1)[0]
        for line in log.read_text().splitlines() if "fsync(" in line and "<" in line
    }
    for folder in (tmp_path, root, root / RUN, root / RUN / "ckpt"):
        assert str(folder) in synced, (folder, sorted(synced))
    assert any(p.endswith("/COMMITTED") for p in synced)
