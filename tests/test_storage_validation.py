"""A checkpoint's own files are checked whole (issue 7, points 10-12): a manifest that matches
its marker but holds nonsense, files the manifest does not list, a folder copied in from another
run. Every defect is a CorruptCheckpointError: ``verify`` exits 1 with one line per problem and
no traceback, resume falls back, and every reader applies the same checks."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from storage_helpers import flip_byte, run_storage_cli, start_writer, step_path

from storage import CorruptCheckpointError, open_store
from storage.hashing import bytes_hash

CHUNK = 1024


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"model/w": torch.randn(40, 16, generator=g), "optim/step": torch.tensor(seed)}  # w: 3 chunks


def _store(root: Path, steps: tuple[int, ...] = (1, 2)):
    store = open_store(str(root), chunk_bytes=CHUNK)
    for s in steps:
        store.save("r", s, _state(s), {"step": s})
    return store


def _rewrite_manifest(root: Path, step: int, edit: Callable[[dict], None]) -> None:
    """Change the manifest and re-sign it in the marker: well-formed, committed, wrong."""
    base = step_path(root, "r", step)
    doc = json.loads((base / "manifest.json").read_bytes())
    edit(doc)
    data = json.dumps(doc).encode()
    (base / "manifest.json").write_bytes(data)
    marker = json.loads((base / "COMMITTED").read_bytes())
    marker["manifest_hash"] = bytes_hash(data)
    (base / "COMMITTED").write_text(json.dumps(marker))


def _w(doc: dict) -> dict:
    return next(a for a in doc["arrays"] if a["name"] == "model/w")


def _absurd_but_consistent(doc: dict) -> None:
    # 2**45 elements in 2048 chunks of 64 GiB, every chunk listed: only the files can tell.
    w = _w(doc)
    w["shape"], w["chunk_shape"] = [2**41, 16], [2**30, 16]
    w["chunks"] = [{"key": f"c/{i}/0", "nbytes": 2**36, "xxh3_128": "0" * 32} for i in range(2048)]


def test_sizes_are_checked_against_the_chunk_files_before_allocating(tmp_path: Path) -> None:
    store = _store(tmp_path)
    _rewrite_manifest(tmp_path, 2, _absurd_but_consistent)
    with pytest.raises(CorruptCheckpointError) as ei:
        store.load("r", 2)
    assert (ei.value.array, ei.value.chunk) == ("model/w", "c/0/0")
    assert "chunk file truncated" in ei.value.reason and str(2**36) in ei.value.reason


CRAFTED: dict[str, Callable[[dict], None]] = {
    "created_unix null": lambda d: d.update(created_unix=None),
    "dtype is a list": lambda d: _w(d).update(dtype=["float32"]),
    "shape of 2**45 elements": lambda d: _w(d).update(shape=[2**41, 16]),
    "100 million chunks": lambda d: _w(d).update(shape=[10**8, 16], chunk_shape=[1, 16]),
    "absurd shape listed consistently": _absurd_but_consistent,
    "state_hash a number": lambda d: d.update(state_hash=5),
    "document hash a list": lambda d: d["documents"].update({"zarr.json": ["x"]}),
    "shape with a float": lambda d: _w(d).update(shape=[40.0, 16]),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_crafted_manifest_is_corrupt_everywhere(tmp_path: Path, case: str) -> None:
    store = _store(tmp_path)
    _rewrite_manifest(tmp_path, 2, CRAFTED[case])
    t0 = time.perf_counter()
    with pytest.raises(CorruptCheckpointError) as ei:
        store.load("r", 2)
    # Nothing enumerated per element or chunk and nothing allocated: building 10**8 chunk entries
    # or a 2**45-element tensor takes minutes (or fails with a RuntimeError), not seconds.
    assert time.perf_counter() - t0 < 20.0
    assert ei.value.step == 2
    seen: list[CorruptCheckpointError] = []
    assert store.load_latest_verified("r", on_corrupt=seen.append).ref.step == 1
    assert store.latest_verified_ref("r").step == 1 and store.latest_committed_ref("r").step == 1
    assert [e.step for e in seen] == [2]
    r = run_storage_cli("verify", str(tmp_path), "r", "2")
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "Traceback" not in r.stdout + r.stderr and r.stderr == ""
    head, *problems = r.stdout.splitlines()
    assert head == "CORRUPT  r@2" and problems, r.stdout
    assert all(line.startswith("  - array=") for line in problems)  # one line per problem


UNLISTED = {
    "extra chunk": ("model/w/c/9/0", "model/w", "c/9/0"),
    "extra array folder": ("model/extra/zarr.json", None, None),
    "stray file": ("notes.txt", None, None),
}


@pytest.mark.parametrize("case", sorted(UNLISTED))
def test_files_the_manifest_does_not_list_are_reported(tmp_path: Path, case: str) -> None:
    store = _store(tmp_path)
    rel, array, chunk = UNLISTED[case]
    extra = step_path(tmp_path, "r", 2) / rel
    extra.parent.mkdir(parents=True, exist_ok=True)
    extra.write_bytes(b"\0" * 64)
    report = store.verify("r", 2)
    assert not report.ok
    assert [(p.array, p.chunk) for p in report.problems] == [(array, chunk)]
    assert rel in report.problems[0].reason
    r = run_storage_cli("verify", str(tmp_path), "r")
    assert r.returncode == 1 and r.stderr == ""
    assert f"not listed in the manifest: {rel}" in r.stdout and "OK       r@1" in r.stdout
    seen: list[CorruptCheckpointError] = []
    assert store.load_latest_verified("r", on_corrupt=seen.append).ref.step == 1
    assert store.latest_committed_ref("r").step == 1
    assert [e.step for e in seen] == [2]


def test_a_checkpoint_copied_from_another_run_is_not_this_runs(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.save("other", 3, _state(3), {"step": 3})
    shutil.copytree(step_path(tmp_path, "other", 3), step_path(tmp_path, "r", 3))
    r = run_storage_cli("verify", str(tmp_path), "r", "3")
    assert r.returncode == 1 and "belongs to run 'other'" in r.stdout, r.stdout
    seen: list[CorruptCheckpointError] = []
    assert store.load_latest_verified("r", on_corrupt=seen.append).ref.step == 2
    assert store.latest_committed_ref("r").step == 2
    assert [e.step for e in seen] == [3] and "belongs to run 'other'" in seen[0].reason


def test_every_reader_applies_the_same_checks(tmp_path: Path) -> None:
    """A damaged array zarr.json: verified ref and verified load agree (both fall back)."""
    store = _store(tmp_path, steps=(1, 2, 3))
    (step_path(tmp_path, "r", 3) / "model" / "w" / "zarr.json").write_text("{}")
    a: list[CorruptCheckpointError] = []
    b: list[CorruptCheckpointError] = []
    assert store.latest_verified_ref("r", on_corrupt=a.append).step == 2
    assert store.load_latest_verified("r", on_corrupt=b.append).ref.step == 2
    assert store.latest_committed_ref("r").step == 2
    assert [(e.step, e.array, e.chunk) for e in a] == [(e.step, e.array, e.chunk) for e in b] == [(3, "model/w", "zarr.json")]


def test_latest_committed_ref_checks_everything_but_chunk_bytes(tmp_path: Path) -> None:
    store = _store(tmp_path, steps=(1, 2, 3))
    flip_byte(step_path(tmp_path, "r", 3) / "model" / "w" / "c" / "0" / "0", 5)  # bytes only
    p = step_path(tmp_path, "r", 2) / "optim" / "step" / "c"
    p.write_bytes(p.read_bytes()[:-1])  # a size the manifest does not say
    seen: list[CorruptCheckpointError] = []
    assert store.latest_committed_ref("r", on_corrupt=seen.append).step == 3
    assert seen == []
    assert store.latest_verified_ref("r", on_corrupt=seen.append).step == 1
    assert [(e.step, e.array) for e in seen] == [(3, "model/w"), (2, "optim/step")]
    (step_path(tmp_path, "r", 3) / "COMMITTED").unlink()
    seen.clear()
    assert store.latest_committed_ref("r", on_corrupt=seen.append) == store.ref("r", 1)
    assert [e.step for e in seen] == [3, 2]


def test_verify_does_not_call_an_in_flight_fsspec_save_corrupt(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("REBOUND_FLAKY_P", "0")
    url = f"flaky://{tmp_path / 'store'}"
    store = open_store(url, chunk_bytes=CHUNK)
    store.save("r", 1, _state(1), {"step": 1})
    barrier = tmp_path / "barrier"
    writer = start_writer(url, "r", 2, seed=2, REBOUND_FLAKY_P="0", REBOUND_STORAGE_FAULT=f"barrier:mid-copy:{barrier}:2")
    try:
        deadline = time.monotonic() + 30
        while not (barrier.is_dir() and any(barrier.iterdir())):  # the writer is copying step 2 in
            assert writer.poll() is None and time.monotonic() < deadline, writer.communicate()
            time.sleep(0.01)
        assert store.step_folders("r") == [1, 2] and store.steps("r") == [1]
        r = run_storage_cli("verify", url, "r")
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert "OK       r@1" in r.stdout and "PENDING  r@2" in r.stdout and "CORRUPT" not in r.stdout
        (barrier / "release").touch()
        out, err = writer.communicate(timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    assert writer.returncode == 0, err
    assert json.loads(out)["outcome"] == "committed"
    r = run_storage_cli("verify", url, "r")
    assert r.returncode == 0 and r.stdout.count("OK") == 2, r.stdout
