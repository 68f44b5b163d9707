"""Every kind of damage is caught, named (run, step, array, chunk), and resume falls back."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from storage_helpers import chunk_files, flip_byte, step_path

from storage import CorruptCheckpointError, open_store
from storage.hashing import bytes_hash

CHUNK = 1024


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model/w": torch.randn(40, 16, generator=g),      # 2560 B -> 3 chunks
        "model/b": torch.randn(16, generator=g).bfloat16(),
        "optim/step": torch.tensor(seed),
    }


def _store_with_steps(root: Path, steps=(1, 2, 3)):
    store = open_store(str(root), chunk_bytes=CHUNK)
    for s in steps:
        store.save("r", s, _state(s), {"step": s})
    return store


def _chunk(root: Path, step: int, array: str, key: str) -> Path:
    return step_path(root, "r", step) / array / key


def _assert_names(err: CorruptCheckpointError, step: int, array: str | None, chunk: str | None) -> None:
    assert (err.run_id, err.step, err.array, err.chunk) == ("r", step, array, chunk)
    for part in ("'r'", f"step {step}") + ((f"'{array}'",) if array else ()) + ((f"'{chunk}'",) if chunk else ()):
        assert part in str(err)


@settings(max_examples=20, deadline=None)
@given(which=st.integers(0, 10**6), pos=st.integers(0, 10**9))
def test_flipped_byte_anywhere_in_any_chunk_is_named(which: int, pos: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        store = _store_with_steps(root, steps=(5,))
        files = chunk_files(root, "r", 5)
        target = files[which % len(files)]
        flip_byte(target, pos)
        rel = target.relative_to(step_path(root, "r", 5)).as_posix()
        array, key = rel.split("/c", 1)[0], "c" + rel.split("/c", 1)[1]
        with pytest.raises(CorruptCheckpointError) as ei:
            store.load("r", 5)
        _assert_names(ei.value, 5, array, key)
        assert "hash mismatch" in ei.value.reason
        report = store.verify("r", 5)
        assert not report.ok and [(p.array, p.chunk) for p in report.problems] == [(array, key)]


def test_truncated_chunk(tmp_path: Path) -> None:
    store = _store_with_steps(tmp_path)
    p = _chunk(tmp_path, 3, "model/w", "c/1/0")
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(CorruptCheckpointError) as ei:
        store.load("r", 3)
    _assert_names(ei.value, 3, "model/w", "c/1/0")
    assert "truncated" in ei.value.reason


def test_chunk_with_extra_bytes(tmp_path: Path) -> None:
    store = _store_with_steps(tmp_path)
    p = _chunk(tmp_path, 3, "optim/step", "c")
    p.write_bytes(p.read_bytes() + b"\0")
    with pytest.raises(CorruptCheckpointError) as ei:
        store.load("r", 3)
    _assert_names(ei.value, 3, "optim/step", "c")


def test_missing_chunk(tmp_path: Path) -> None:
    store = _store_with_steps(tmp_path)
    _chunk(tmp_path, 3, "model/b", "c/0").unlink()
    with pytest.raises(CorruptCheckpointError) as ei:
        store.load("r", 3)
    _assert_names(ei.value, 3, "model/b", "c/0")
    assert "missing" in ei.value.reason
    assert not store.verify("r", 3).ok


def test_missing_manifest(tmp_path: Path) -> None:
    store = _store_with_steps(tmp_path)
    (step_path(tmp_path, "r", 3) / "manifest.json").unlink()
    with pytest.raises(CorruptCheckpointError, match="manifest.json missing") as ei:
        store.load("r", 3)
    _assert_names(ei.value, 3, None, None)
    with pytest.raises(CorruptCheckpointError):
        store.read_metadata("r", 3)


def test_garbled_manifest(tmp_path: Path) -> None:
    store = _store_with_steps(tmp_path)
    m = step_path(tmp_path, "r", 3) / "manifest.json"
    m.write_bytes(m.read_bytes()[:100] + b"#garbage#" + m.read_bytes()[109:])
    with pytest.raises(CorruptCheckpointError, match="manifest hash"):
        store.load("r", 3)
    with pytest.raises(CorruptCheckpointError):
        store.read_metadata("r", 3)


def test_garbled_manifest_with_matching_marker_is_still_rejected(tmp_path: Path) -> None:
    # Someone rewrote both files consistently: the manifest must still parse and validate.
    store = _store_with_steps(tmp_path)
    base = step_path(tmp_path, "r", 3)
    bad = b"{not json"
    (base / "manifest.json").write_bytes(bad)
    marker = json.loads((base / "COMMITTED").read_bytes())
    marker["manifest_hash"] = bytes_hash(bad)
    (base / "COMMITTED").write_text(json.dumps(marker))
    with pytest.raises(CorruptCheckpointError, match="not valid JSON"):
        store.load("r", 3)


def test_missing_commit_marker(tmp_path: Path) -> None:
    store = _store_with_steps(tmp_path)
    (step_path(tmp_path, "r", 3) / "COMMITTED").unlink()
    assert store.steps("r") == [1, 2]  # readers only trust committed steps
    with pytest.raises(CorruptCheckpointError, match="commit marker missing") as ei:
        store.load("r", 3)
    _assert_names(ei.value, 3, None, None)
    reported: list[CorruptCheckpointError] = []
    ckpt = store.load_latest_verified("r", on_corrupt=reported.append)
    assert ckpt is not None and ckpt.ref.step == 2
    assert [e.step for e in reported] == [3]
    store.save("r", 3, _state(3), {"step": 3})  # saving the step again repairs it
    assert store.steps("r") == [1, 2, 3] and store.verify("r", 3).ok


def test_garbled_commit_marker(tmp_path: Path) -> None:
    store = _store_with_steps(tmp_path)
    (step_path(tmp_path, "r", 3) / "COMMITTED").write_bytes(b"\x00\x01")
    with pytest.raises(CorruptCheckpointError, match="marker"):
        store.load("r", 3)


@pytest.mark.parametrize("name", ["../../../escape", "/etc/passwd", "model/../../x", "a\\b", "ok/../.."])
def test_manifest_names_that_escape_the_folder_are_rejected(tmp_path: Path, name: str) -> None:
    store = _store_with_steps(tmp_path, steps=(1,))
    base = step_path(tmp_path, "r", 1)
    doc = json.loads((base / "manifest.json").read_bytes())
    doc["arrays"][0]["name"] = name
    data = json.dumps(doc).encode()
    (base / "manifest.json").write_bytes(data)
    marker = json.loads((base / "COMMITTED").read_bytes())
    marker["manifest_hash"] = bytes_hash(data)
    (base / "COMMITTED").write_text(json.dumps(marker))
    with pytest.raises(CorruptCheckpointError, match="unsafe array name") as ei:
        store.load("r", 1)
    assert ei.value.array == name


def test_forged_chunk_key_in_manifest_is_rejected(tmp_path: Path) -> None:
    store = _store_with_steps(tmp_path, steps=(1,))
    base = step_path(tmp_path, "r", 1)
    doc = json.loads((base / "manifest.json").read_bytes())
    doc["arrays"][0]["chunks"][0]["key"] = "../../../../etc/passwd"
    data = json.dumps(doc).encode()
    (base / "manifest.json").write_bytes(data)
    marker = json.loads((base / "COMMITTED").read_bytes())
    marker["manifest_hash"] = bytes_hash(data)
    (base / "COMMITTED").write_text(json.dumps(marker))
    with pytest.raises(CorruptCheckpointError, match="does not match the layout"):
        store.load("r", 1)


def test_damaged_zarr_json_fails_verify(tmp_path: Path) -> None:
    store = _store_with_steps(tmp_path, steps=(1,))
    (step_path(tmp_path, "r", 1) / "model" / "w" / "zarr.json").write_text("{}")
    report = store.verify("r", 1)
    assert not report.ok
    assert [(p.array, p.chunk) for p in report.problems] == [("model/w", "zarr.json")]


def test_latest_verified_falls_back_past_every_corrupt_newer_step(tmp_path: Path) -> None:
    store = _store_with_steps(tmp_path, steps=(1, 2, 3, 4))
    flip_byte(_chunk(tmp_path, 4, "model/w", "c/0/0"), 17)
    _chunk(tmp_path, 3, "optim/step", "c").unlink()
    reported: list[CorruptCheckpointError] = []
    ckpt = store.load_latest_verified("r", on_corrupt=reported.append)
    assert ckpt is not None and ckpt.ref.step == 2 and ckpt.metadata == {"step": 2}
    assert torch.equal(ckpt.tensors["model/w"], _state(2)["model/w"])
    assert [(e.step, e.array, e.chunk) for e in reported] == [(4, "model/w", "c/0/0"), (3, "optim/step", "c")]


def test_latest_verified_is_none_when_everything_is_corrupt(tmp_path: Path) -> None:
    store = _store_with_steps(tmp_path, steps=(1,))
    flip_byte(_chunk(tmp_path, 1, "model/w", "c/2/0"), 0)
    seen: list[CorruptCheckpointError] = []
    assert store.load_latest_verified("r", on_corrupt=seen.append) is None
    assert len(seen) == 1


def test_resaving_a_corrupt_committed_step_rewrites_it(tmp_path: Path) -> None:
    store = _store_with_steps(tmp_path, steps=(1,))
    flip_byte(_chunk(tmp_path, 1, "model/w", "c/0/0"), 3)
    store.save("r", 1, _state(1), {"step": 1})
    assert store.last_save_stats.outcome == "committed"
    assert store.verify("r", 1).ok


def test_corrupt_error_survives_pickling() -> None:
    import pickle

    e = CorruptCheckpointError("r", 3, "hash mismatch", array="a", chunk="c/0")
    e2 = pickle.loads(pickle.dumps(e))
    assert (e2.run_id, e2.step, e2.array, e2.chunk, str(e2)) == ("r", 3, "a", "c/0", str(e))
