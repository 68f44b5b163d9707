"""Sharded checkpoint writes (issue 8, DESIGN.md §8 "Writes"): several writer processes each
write a disjoint share into one staging area, one of them commits, and the result is the
checkpoint a single ``save`` would have written.

Run as a script it is one rank's share writer:
``python tests/test_storage_shards.py STORE RUN STEP SEED SESSION RANK WORLD`` writes its share
of ``numpy_state(SEED)`` (small chunks) and prints the receipt's JSON.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from storage_helpers import (
    ROOT,
    SMALL_CHUNK,
    env_for_child,
    numpy_state,
    run_storage_cli,
    step_path,
)

RUN = "dp"
HERE = Path(__file__).resolve()


def _store(url: str):
    from datetime import timedelta

    from storage import open_store

    return open_store(url, chunk_bytes=SMALL_CHUNK, staging_grace=timedelta(0), pack_bytes=0)


def start_share(store: str, step: int, seed: int, session: str, rank: int, world: int, **env: str) -> subprocess.Popen:
    """One rank's share writer as a real process (see the module doc)."""
    return subprocess.Popen(
        [sys.executable, str(HERE), store, RUN, str(step), str(seed), session, str(rank), str(world)],
        cwd=ROOT, env=env_for_child(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(procs: list[subprocess.Popen], timeout: float = 120) -> list[tuple[int, str, str]]:
    """Wait for every process; kill (by pid) any still running, also when the test fails."""
    out = []
    try:
        for p in procs:
            so, se = p.communicate(timeout=timeout)
            out.append((p.returncode, so, se))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return out


def _stagings(root: Path) -> list[str]:
    return sorted(p.name for p in (root / RUN / "ckpt").glob(".staging-*"))


def _files(base: Path) -> dict[str, bytes]:
    return {p.relative_to(base).as_posix(): p.read_bytes() for p in base.rglob("*") if p.is_file()}


def _manifest_minus_time(store, step: int) -> dict:
    doc = json.loads(store.backend.read_bytes(f"{RUN}/ckpt/{step:012d}/manifest.json"))
    doc.pop("created_unix")
    return doc


def _same_as_single_save(store, step: int, seed: int, meta: dict, single_url: str) -> None:
    """The sharded checkpoint equals one ``save`` of the same tensors: manifest (but its
    timestamp), every other file byte for byte where the store is local, and state_hash."""
    from storage import state_hash

    single = _store(single_url)
    single.save(RUN, step, numpy_state(seed), meta)
    assert _manifest_minus_time(store, step) == _manifest_minus_time(single, step)
    if not store.url.startswith("memory://"):
        got = _files(step_path(Path(store.url.removeprefix("flaky://")), RUN, step))
        want = _files(step_path(Path(single.url), RUN, step))
        for f in ("manifest.json", "COMMITTED"):
            got.pop(f), want.pop(f)
        assert got == want
    assert store.state_hash(RUN, step) == single.state_hash(RUN, step) == state_hash(numpy_state(seed))


@pytest.mark.parametrize("world", [2, 3])
def test_writer_processes_share_one_checkpoint(tmp_path: Path, world: int) -> None:
    import zarr

    from storage.shards import ShareReceipt

    root, barrier, step, seed = tmp_path / "store", tmp_path / "barrier", 7, 11
    store = _store(str(root))
    # Each writer waits inside the staging area, its files written, until all have arrived:
    # the shares really are written at the same time into one area.
    fault = f"barrier:share-written:{barrier}:{world}"
    procs = [start_share(str(root), step, seed, "g0", r, world, REBOUND_STORAGE_FAULT=fault) for r in range(world)]
    results = finish(procs)
    assert [rc for rc, _, _ in results] == [0] * world, [se for _, _, se in results]
    assert len(os.listdir(barrier)) == world
    receipts = [ShareReceipt.from_json(so) for _, so, _ in results]
    assert _stagings(root) == [f".staging-{step:012d}-g0"]
    assert store.steps(RUN) == []  # nothing visible before the commit

    shares = [{f for f, _ in r.files} for r in receipts]
    assert all(r.chunks_written > 0 and r.bytes_reused == 0 for r in receipts)
    assert sum(len(s) for s in shares) == len(set().union(*shares))  # disjoint
    total = sum(a.nbytes for a in numpy_state(seed).values())
    written = sum(r.bytes_written for r in receipts)
    assert total <= written < total + world * SMALL_CHUNK  # every byte once (plus edge padding)

    meta = {"step": step, "epoch": 0}
    ref = store.commit_shares(RUN, step, receipts, meta, session="g0")
    assert store.last_save_stats.outcome == "committed"
    assert store.last_save_stats.bytes_written == written
    assert store.steps(RUN) == [step] and ref == store.ref(RUN, step)
    assert _stagings(root) == []
    assert store.verify(RUN, step).ok
    assert store.read_metadata(RUN, step) == meta
    cli = run_storage_cli("verify", str(root), RUN, str(step))
    assert cli.returncode == 0, cli.stdout + cli.stderr
    group = zarr.open_group(store.checkpoint_url(RUN, step), mode="r")
    for name, want in numpy_state(seed).items():
        got = group[name][...]
        assert got.dtype == want.dtype and np.array_equal(got, want), name
    _same_as_single_save(store, step, seed, meta, str(tmp_path / "single"))


@pytest.mark.parametrize("retry_session", ["g1", "g0"], ids=["new-session", "same-session"])
def test_share_writer_killed_mid_share_then_retry(tmp_path: Path, retry_session: str) -> None:
    from storage.shards import ShareError, ShareReceipt

    root, step, seed = tmp_path / "store", 2, 5
    store = _store(str(root))
    store.save(RUN, 1, numpy_state(1), {"step": 1})
    ok, killed = finish([
        start_share(str(root), step, seed, "g0", 0, 2),
        start_share(str(root), step, seed, "g0", 1, 2, REBOUND_STORAGE_FAULT="chunks:3"),
    ])
    assert ok[0] == 0, ok[2]
    assert killed[0] == -signal.SIGKILL  # really killed, after its third chunk file
    assert store.steps(RUN) == [1]
    assert not step_path(root, RUN, step).exists()
    assert store.load_latest_verified(RUN).ref.step == 1
    with pytest.raises(ShareError, match=r"missing share\(s\) of rank\(s\) \[1\] of 2"):
        store.commit_shares(RUN, step, [ShareReceipt.from_json(ok[1])], {"step": step}, session="g0")
    assert store.steps(RUN) == [1] and not step_path(root, RUN, step).exists()

    # The group re-forms (maybe under a new session name) and both ranks write again.
    state = numpy_state(seed)
    receipts = [
        store.write_share(RUN, step, state, session=retry_session, rank=r, world_size=2) for r in (0, 1)
    ]
    r0, r1 = receipts
    assert r1.chunks_reused >= 3 and r1.bytes_reused >= 3 * SMALL_CHUNK  # the dead rank's chunks
    assert r0.chunks_written == 0 and r0.bytes_reused > 0  # rank 0's whole share was durable
    ref = store.commit_shares(RUN, step, receipts, {"step": step}, session=retry_session)
    assert store.last_save_stats.bytes_reused == r0.bytes_reused + r1.bytes_reused
    assert store.steps(RUN) == [1, step] and store.verify(RUN, step).ok
    assert ref == store.ref(RUN, step)
    store.clean_staging(RUN)  # the dead session's area (if any) belongs to nobody now
    assert _stagings(root) == []
    _same_as_single_save(store, step, seed, {"step": step}, str(tmp_path / "single"))


def test_bad_receipts_are_refused_and_commit_nothing(tmp_path: Path) -> None:
    import dataclasses

    from storage.shards import ShareError, ShareReceipt

    root, step, seed = tmp_path / "store", 4, 3
    store = _store(str(root))
    state = numpy_state(seed)
    good = [store.write_share(RUN, step, state, session="s", rank=r, world_size=3) for r in range(3)]
    other_plan = store.write_share(RUN, step, state, session="s", rank=1, world_size=2)
    forged = dataclasses.replace(good[1], files=good[1].files[1:])
    # A rank whose state differs (here: it says so through the caller-supplied hash).
    drifted = store.write_share(RUN, step, state, session="s", rank=2, world_size=3, state_hash="0" * 32)
    assert drifted.files == good[2].files and drifted.chunks_reused == good[2].chunks_written
    cases = {
        r"missing share\(s\) of rank\(s\) \[2\] of 3": good[:2],
        r"share of rank\(s\) \[1\] given twice": [*good, good[1]],
        r"planned different checkpoints": [good[0], other_plan, good[2]],
        r"rank 1's share does not match the plan": [good[0], forged, good[2]],
        r"ranks disagree on state_hash": [good[0], good[1], drifted],
        r"for dp@4 \(session 'other'\), not dp@4 \(session 's'\)": [dataclasses.replace(g, session="other") for g in good],
        r"no share receipts": [],
    }
    for pattern, receipts in cases.items():
        with pytest.raises(ShareError, match=pattern) as err:
            store.commit_shares(RUN, step, receipts, {"step": step}, session="s")
        assert "\n" not in str(err.value)
        assert store.steps(RUN) == [] and not step_path(root, RUN, step).exists()
    with pytest.raises(ValueError, match="malformed share receipt"):
        ShareReceipt.from_json(good[0].to_json().replace('"rank":0', '"rank":-1'))
    # The refusals kept every share: the right receipts (through JSON) still commit.
    wire = [ShareReceipt.from_json(r.to_json()) for r in reversed(good)]
    assert wire == list(reversed(good))
    store.commit_shares(RUN, step, wire, {"step": step}, session="s")
    assert store.verify(RUN, step).ok
    # Already committed and verified: an "existing" outcome, and the retry's area is dropped.
    again = [store.write_share(RUN, step, state, session="t", rank=r, world_size=3) for r in range(3)]
    assert store.commit_shares(RUN, step, again, {"step": step}, session="t") == store.ref(RUN, step)
    assert store.last_save_stats.outcome == "existing"
    assert _stagings(root) == []


def test_plan_is_deterministic_balanced_and_chunk_grained() -> None:
    from storage.shards import FILE_COST_BYTES, plan_shards

    # Three equal giants (an embedding and its two AdamW moments) and some small tensors: by
    # whole arrays two ranks would split 2:1; by chunk files they split evenly.
    big = {f"{k}/emb": np.zeros((64, 1024), np.float32) for k in ("model", "optim/exp_avg", "optim/exp_avg_sq")}
    small = {f"model/b{i}": np.zeros(i + 1, np.float32) for i in range(7)}
    state = {**big, **small}
    chunk = 32 << 10
    plan = plan_shards(state, 2, chunk)
    shuffled = dict(reversed(list(state.items())))
    assert plan_shards(shuffled, 2, chunk) == plan  # same on every rank, whatever the dict order
    files = [f for share in plan for f in share]
    assert len(files) == len(set(files))
    n_chunks = 3 * (64 * 1024 * 4 // chunk) + len(small)
    assert len(files) == n_chunks + len(state)  # every chunk file and every array's zarr.json
    loads = []
    for share in plan:
        nbytes = sum(chunk if "emb/c/" in f else 0 for f in share)
        loads.append(nbytes)
    assert abs(loads[0] - loads[1]) <= chunk
    assert max(len(s) for s in plan) - min(len(s) for s in plan) <= 2
    assert FILE_COST_BYTES > 0
    with pytest.raises(ValueError, match="world_size"):
        plan_shards(state, 0)


@pytest.fixture
def memory_url() -> Iterator[str]:
    import fsspec

    name = f"t{uuid.uuid4().hex}"
    yield f"memory://{name}"
    fs = fsspec.filesystem("memory")
    for folder in (name, f"{name}-single"):
        if fs.exists(folder):
            fs.rm(folder, recursive=True)


@pytest.mark.parametrize("kind", ["memory", "flaky"])
def test_threads_share_on_fsspec_stores(tmp_path: Path, kind: str, memory_url: str, monkeypatch) -> None:
    """Three writer threads on memory:// and on flaky:// (whose first writes fail: each rank
    and the committer retry, and the retries keep what already landed)."""
    from storage import TransientStoreError
    from storage.flaky import FlakyFileSystem

    url = memory_url if kind == "memory" else f"flaky://{tmp_path / 'store'}"
    single_url = f"{memory_url}-single" if kind == "memory" else str(tmp_path / "single")
    FlakyFileSystem.clear_instance_cache()  # the injector reads its settings when created
    monkeypatch.setenv("REBOUND_FLAKY_FIRST", "4")
    monkeypatch.setenv("REBOUND_STORAGE_FAULT", f"barrier:share-written:{tmp_path / 'barrier'}:3")
    store = _store(url)
    step, seed, world = 3, 8, 3
    state = numpy_state(seed)

    def retrying(fn):
        for _ in range(20):
            try:
                return fn()
            except TransientStoreError:
                continue
        raise AssertionError("still failing after 20 attempts")

    try:
        with ThreadPoolExecutor(world) as pool:
            futs = [
                pool.submit(retrying, lambda r=r: store.write_share(RUN, step, state, session="m", rank=r, world_size=world))
                for r in range(world)
            ]
            receipts = [f.result(timeout=120) for f in futs]
        assert len(os.listdir(tmp_path / "barrier")) >= world
        assert store.steps(RUN) == []
        monkeypatch.delenv("REBOUND_STORAGE_FAULT")
        retrying(lambda: store.commit_shares(RUN, step, receipts, {"step": step}, session="m"))
        if kind == "flaky":
            assert store.backend.fs.injected == 4
        assert store.steps(RUN) == [step] and store.verify(RUN, step).ok
        assert [n for n in store.backend.list_dir(f"{RUN}/ckpt") if n.startswith(".")] == []
        _same_as_single_save(store, step, seed, {"step": step}, single_url)
    finally:
        FlakyFileSystem.clear_instance_cache()


def test_two_committers_of_one_session(tmp_path: Path, memory_url: str, monkeypatch) -> None:
    """A committing task run twice at once (a zombie and its rerun): both finish with the one
    checkpoint, which verifies. On memory:// both stage their manifest before either copies,
    so their manifests must be the same bytes; locally the second waits for the first."""
    from storage import TransientStoreError

    for url in (memory_url, str(tmp_path / "store")):
        store = _store(url)
        state = numpy_state(4)
        receipts = [store.write_share(RUN, 6, state, session="z", rank=r, world_size=2) for r in (0, 1)]
        if url == memory_url:
            monkeypatch.setenv("REBOUND_STORAGE_FAULT", f"barrier:before-commit:{tmp_path / 'b'}:2")
        with ThreadPoolExecutor(2) as pool:
            futs = [pool.submit(store.commit_shares, RUN, 6, receipts, {"step": 6}, session="z") for _ in range(2)]
            outcomes = []
            for f in futs:
                try:
                    outcomes.append(f.result(timeout=120))
                except TransientStoreError as e:  # came after the publication: its area is gone
                    assert "missing" in str(e)
                    outcomes.append(store.commit_shares(RUN, 6, receipts, {"step": 6}, session="z"))
        monkeypatch.delenv("REBOUND_STORAGE_FAULT", raising=False)
        assert outcomes[0] == outcomes[1] == store.ref(RUN, 6)
        report = store.verify(RUN, 6)
        assert report.ok, report.problems
        store.clean_staging(RUN)
        assert [n for n in store.backend.list_dir(f"{RUN}/ckpt") if n.startswith(".")] == []


def test_commit_waits_for_a_writer_still_in_the_area(tmp_path: Path) -> None:
    """Locally the committer takes the area only once no share writer holds it: a duplicate
    writer of rank 1, still inside (held at a barrier), delays the commit until it is done."""
    import threading

    root, barrier = tmp_path / "store", tmp_path / "b"
    store = _store(str(root))
    receipts = [store.write_share(RUN, 9, numpy_state(9), session="w", rank=r, world_size=2) for r in (0, 1)]
    straggler = start_share(str(root), 9, 9, "w", 1, 2, REBOUND_STORAGE_FAULT=f"barrier:share-written:{barrier}:2")
    try:
        while not (barrier.exists() and os.listdir(barrier)):  # inside the area, holding it
            assert straggler.poll() is None, straggler.communicate()
            threading.Event().wait(0.01)
        done = threading.Event()
        committer = threading.Thread(
            target=lambda: (store.commit_shares(RUN, 9, receipts, {"step": 9}, session="w"), done.set())
        )
        committer.start()
        assert not done.wait(1.0)  # blocked behind the straggler
        assert store.steps(RUN) == []
        (barrier / "release").touch()  # let the straggler finish its share
        rc, _, err = finish([straggler])[0]
        assert rc == 0, err
        assert done.wait(60)
        committer.join()
    finally:
        finish([straggler])
    assert store.steps(RUN) == [9] and store.verify(RUN, 9).ok


def test_cleanup_spares_an_area_whose_last_writer_just_left(tmp_path: Path) -> None:
    """An area stays unlocked between the last share and the commit; the cleanup grace runs
    from when the last writer left, not from when the area was made."""
    from datetime import timedelta

    from storage import open_store

    root = tmp_path / "store"
    store = open_store(str(root), chunk_bytes=SMALL_CHUNK, staging_grace=timedelta(seconds=60), pack_bytes=0)
    state = numpy_state(2)
    r0 = store.write_share(RUN, 1, state, session="c", rank=0, world_size=2)
    area = root / RUN / "ckpt" / f".staging-{1:012d}-c"
    os.utime(area, (1e9, 1e9))  # made long ago (rank 1 was slow)
    r1 = store.write_share(RUN, 1, state, session="c", rank=1, world_size=2)
    assert store.clean_staging(RUN) == []
    store.commit_shares(RUN, 1, [r0, r1], {}, session="c")
    assert store.verify(RUN, 1).ok


def _main(argv: list[str]) -> int:
    sys.path.insert(0, str(ROOT))
    store_url, run, step, seed, session, rank, world = argv
    receipt = _store(store_url).write_share(
        run, int(step), numpy_state(int(seed)), session=session, rank=int(rank), world_size=int(world)
    )
    print(receipt.to_json())
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
