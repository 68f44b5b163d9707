"""Retention (keep last K, every Nth, protected, never the newest verified) and export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from storage_helpers import chunk_files, flip_byte

from storage import open_store
from storage.retention import steps_to_delete


@settings(max_examples=60, deadline=None)
@given(
    steps=st.sets(st.integers(0, 60), max_size=15),
    keep_last=st.integers(1, 5),
    keep_every=st.none() | st.integers(1, 12),
    protect=st.sets(st.integers(0, 60), max_size=3),
    data=st.data(),
)
def test_retention_policy_properties(steps, keep_last, keep_every, protect, data) -> None:
    ordered = sorted(steps)
    newest_verified = data.draw(st.none() | st.sampled_from(ordered)) if ordered else None
    doomed = steps_to_delete(steps, keep_last, keep_every, protect, newest_verified)
    kept = set(ordered) - set(doomed)
    assert set(doomed) <= set(ordered) and doomed == sorted(doomed)
    assert set(ordered[-keep_last:]) <= kept
    assert (set(protect) & set(ordered)) <= kept
    if keep_every:
        assert {s for s in ordered if s % keep_every == 0} <= kept
    if newest_verified is not None:
        assert newest_verified in kept
    for s in doomed:  # nothing is deleted that some rule wanted kept
        assert s not in ordered[-keep_last:] and s not in protect and s != newest_verified
        assert not (keep_every and s % keep_every == 0)


@pytest.mark.parametrize("keep_last,keep_every", [(0, None), (-1, None), (2, 0)])
def test_retention_rejects_bad_settings(keep_last, keep_every) -> None:
    with pytest.raises(ValueError):
        steps_to_delete([1, 2], keep_last, keep_every)


def _fill(root: Path, steps) -> object:
    store = open_store(str(root), chunk_bytes=256)
    for s in steps:
        store.save("r", s, {"w": torch.full((16, 4), float(s)), "t": torch.tensor(s)}, {"step": s})
    return store


def test_gc_keep_last_and_keep_every(tmp_path: Path) -> None:
    store = _fill(tmp_path, [10, 20, 30, 40, 50, 60, 70])
    assert store.gc("r", keep_last=2, keep_every=30, protect=[20]) == [10, 40, 50]
    assert store.steps("r") == [20, 30, 60, 70]
    assert store.gc("r", keep_last=2, keep_every=30, protect=[20]) == []


def test_gc_never_deletes_the_newest_verified(tmp_path: Path) -> None:
    store = _fill(tmp_path, [1, 2, 3])
    for step in (2, 3):
        flip_byte(chunk_files(tmp_path, "r", step)[0], 1)
    assert store.gc("r", keep_last=1) == [2]
    assert store.steps("r") == [1, 3]
    assert store.load_latest_verified("r").ref.step == 1


def test_gc_after_a_save_reads_nothing_back(tmp_path: Path) -> None:
    store = _fill(tmp_path, [1, 2])
    ref = store.save("r", 3, {"w": torch.full((16, 4), 3.0), "t": torch.tensor(3)}, {"step": 3})
    reads: list[str] = []
    read_chunk = store.backend.read_chunk
    store.backend.read_chunk = lambda path, *a, **k: reads.append(path) or read_chunk(path, *a, **k)
    assert store.gc("r", keep_last=1, just_committed=ref) == [1, 2]
    assert reads == []  # the step just written is trusted, not read back
    # A ref whose manifest hash is not what the store holds for step 3 is not trusted.
    stale = type(ref)(ref.run_id, ref.step, "0" * len(ref.manifest_hash))
    assert store.gc("r", keep_last=1, just_committed=stale) == []
    assert reads  # verified the usual way


def test_gc_validates_before_deleting(tmp_path: Path) -> None:
    store = _fill(tmp_path, [1, 2])
    with pytest.raises(ValueError, match="keep_last"):
        store.gc("r", keep_last=0)
    assert store.steps("r") == [1, 2]


def test_export_safetensors_round_trip(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    store = open_store(str(tmp_path / "s"))
    state = {"model/w": torch.randn(5, 3), "model/b": torch.randn(3).bfloat16(), "optim/step": torch.tensor(4),
             "model/mask": torch.tensor([True, False])}
    store.save("r", 4, state, {"step": 4})
    out = tmp_path / "out.safetensors"
    store.export("r", 4, str(out), "safetensors")
    got = load_file(str(out))
    assert sorted(got) == sorted(state)
    for k, v in state.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v)
    with safe_open(str(out), "pt") as f:
        assert '"step": 4' in f.metadata()["rebound_metadata"]
    model_only = tmp_path / "model.safetensors"
    store.export("r", 4, str(model_only), "safetensors", prefix="model/")
    assert sorted(load_file(str(model_only))) == ["b", "mask", "w"]


def test_export_torch_round_trip_loads_without_pickle_code(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "s"))
    state = {"model/w": torch.randn(5, 3), "model/h": torch.randn(2, 2).half(), "optim/n": torch.tensor(7)}
    store.save("r", 1, state, {})
    out = tmp_path / "out.pt"
    store.export("r", 1, str(out), "torch")
    got = torch.load(str(out), weights_only=True)
    assert sorted(got) == sorted(state) and all(torch.equal(got[k], v) for k, v in state.items())
    with pytest.raises(ValueError):
        store.export("r", 1, str(out), "pickle")  # type: ignore[arg-type]


def test_export_refuses_a_corrupt_checkpoint(tmp_path: Path) -> None:
    from storage import CorruptCheckpointError

    store = _fill(tmp_path / "s", [1])
    flip_byte(chunk_files(tmp_path / "s", "r", 1)[0], 0)
    with pytest.raises(CorruptCheckpointError):
        store.export("r", 1, str(tmp_path / "x.safetensors"))
    assert not (tmp_path / "x.safetensors").exists()
