"""Bit-exact round trips of random state dicts, zarr-python compatibility, state_hash, names."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from storage_helpers import assert_same_tensors, chunk_files, step_path, zarr_tensor

from storage import CheckpointRef, open_store, state_hash

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
          torch.uint8, torch.int8, torch.bool]


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    """A tensor of any supported dtype with arbitrary bit patterns, 0-d to 3-d, maybe empty,
    maybe non-contiguous."""
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 7), min_size=0, max_size=3)))
    seed = draw(st.integers(0, 2**31))
    layout = draw(st.sampled_from(["contiguous", "transposed", "strided"]))
    g = torch.Generator().manual_seed(seed)
    base_shape = shape
    if layout == "transposed" and len(shape) >= 2:
        base_shape = (shape[1], shape[0], *shape[2:])
    elif layout == "strided" and len(shape) >= 1:
        base_shape = (shape[0] * 2, *shape[1:])
    n = int(np.prod(base_shape)) if base_shape else 1
    if dtype == torch.bool:
        t = torch.randint(0, 2, (n,), generator=g, dtype=torch.uint8).bool()
    else:
        itemsize = torch.empty((), dtype=dtype).element_size()
        raw = torch.randint(0, 256, (n * itemsize,), generator=g, dtype=torch.uint8)
        t = raw.view(dtype)  # any bit pattern, NaN payloads included
    t = t.reshape(base_shape)
    if layout == "transposed" and len(shape) >= 2:
        t = t.transpose(0, 1)
    elif layout == "strided" and len(shape) >= 1:
        t = t[::2]
    assert tuple(t.shape) == shape
    return t


@st.composite
def state_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    items = draw(st.lists(tensors(), min_size=1, max_size=6))
    prefixes = ["model", "model/transformer.h.0", "optim/state/0", "rng"]
    return {f"{draw(st.sampled_from(prefixes))}/t{i}": t for i, t in enumerate(items)}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(state=state_dicts(), chunk_bytes=st.sampled_from([7, 64, 4096]))
def test_random_state_dicts_round_trip_bit_exact(state: dict[str, torch.Tensor], chunk_bytes: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        store = open_store(d, chunk_bytes=chunk_bytes)
        meta = {"step": 3, "epoch": 1, "cursor": [1, 2], "loss": 0.25}
        ref = store.save("run", 3, state, meta)
        ckpt = store.load("run", 3, device="cpu")
        assert_same_tensors(ckpt.tensors, state)
        assert ckpt.metadata == meta
        assert ckpt.ref == ref
        assert store.state_hash("run", 3) == state_hash(state) == state_hash(ckpt.tensors)
        # zarr-python reads every array back unchanged (bfloat16 as its uint16 bits).
        group = zarr.open_group(str(step_path(Path(d), "run", 3)), mode="r")
        assert group.attrs["metadata"] == meta
        for name, t in state.items():
            got, dtype = zarr_tensor(group, name)
            assert dtype == str(t.dtype).removeprefix("torch.")
            want = t.contiguous().numpy() if t.dtype != torch.bfloat16 else t.contiguous().view(torch.uint16).numpy()
            assert got.shape == tuple(t.shape)
            assert got.tobytes() == want.tobytes(), name


def test_every_non_empty_chunk_exists_even_when_all_zero(tmp_path: Path) -> None:
    # zarr's write_empty_chunks=False would skip these; every chunk must exist to be hashed.
    store = open_store(str(tmp_path), chunk_bytes=1024, pack_bytes=0)  # each tensor its own array
    store.save("r", 1, {"z": torch.zeros(100, 8), "e": torch.empty(0, 5), "s": torch.tensor(0.0)}, {})
    manifest, _ = store.read_manifest("r", 1)
    expected = sum(len(a.layout.chunks) for a in manifest.arrays)
    assert expected == 4 + 0 + 1
    assert len(chunk_files(tmp_path, "r", 1)) == expected
    assert (step_path(tmp_path, "r", 1) / "s" / "c").is_file()  # a 0-d array's chunk key is "c"


def test_edge_chunk_is_padded_to_full_chunk_shape(tmp_path: Path) -> None:
    store = open_store(str(tmp_path), chunk_bytes=4 * 10 * 3)  # 3 rows of 10 float32 per chunk
    t = torch.arange(70, dtype=torch.float32).reshape(7, 10)
    store.save("r", 1, {"w": t}, {})
    manifest, _ = store.read_manifest("r", 1)
    (entry,) = manifest.arrays
    assert entry.layout.chunk_shape == (3, 10)
    assert [c.nbytes for c in entry.layout.chunks] == [120, 120, 120]
    assert (step_path(tmp_path, "r", 1) / "w" / "c" / "2" / "0").stat().st_size == 120
    assert torch.equal(store.load("r", 1).tensors["w"], t)
    assert np.array_equal(zarr.open_group(str(step_path(tmp_path, "r", 1)), mode="r")["w"][:], t.numpy())


def test_numpy_inputs_come_back_as_torch(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    state = {"a": np.arange(6, dtype=np.int64).reshape(2, 3), "b": np.float16(1.5) * np.ones(3, np.float16),
             "big_endian": np.arange(4, dtype=">f4")}
    store.save("r", 0, state, {})
    got = store.load("r", 0).tensors
    assert torch.equal(got["a"], torch.arange(6).reshape(2, 3))
    assert got["big_endian"].dtype == torch.float32
    assert torch.equal(got["big_endian"], torch.arange(4, dtype=torch.float32))
    assert state_hash(state) == store.state_hash("r", 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_to_cuda(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    state = {"w": torch.randn(5, 5), "b": torch.randn(3).bfloat16()}
    store.save("r", 0, state, {})
    got = store.load("r", 0, device="cuda").tensors
    assert all(t.device.type == "cuda" for t in got.values())
    assert_same_tensors({k: v.cpu() for k, v in got.items()}, state)


def test_state_hash_depends_on_name_dtype_shape_and_bytes() -> None:
    base = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3)}
    h = state_hash(base)
    assert len(h) == 32 and int(h, 16) >= 0
    assert state_hash({"b": base["a"]}) != h
    assert state_hash({"a": base["a"].reshape(3, 2)}) != h
    assert state_hash({"a": base["a"].view(torch.int32)}) != h
    assert state_hash({"a": base["a"] + 1}) != h
    assert state_hash({"a": base["a"].t().contiguous().t()}) == h  # strides do not matter
    assert state_hash({"a": base["a"].numpy()}) == h


def test_save_is_idempotent_and_writes_nothing_the_second_time(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    state = {"w": torch.randn(64, 64)}
    ref = store.save("r", 7, state, {"step": 7})
    assert store.last_save_stats.outcome == "committed"
    again = store.save("r", 7, state, {"step": 7})
    assert again == ref
    assert store.last_save_stats.outcome == "existing"
    assert store.last_save_stats.bytes_written == 0
    assert store.steps("r") == [7] and store.runs() == ["r"]
    assert CheckpointRef.from_dict(ref.to_dict()) == ref
    assert store.read_metadata("r", 7) == {"step": 7}


@pytest.mark.parametrize(
    "bad",
    ["/abs", "../up", "a/../b", "a//b", "a\\b", "sp ace", "", "manifest.json", "COMMITTED", "x/zarr.json",
     "a/./b", "ü"],
)
def test_bad_array_names_are_rejected_before_writing(tmp_path: Path, bad: str) -> None:
    store = open_store(str(tmp_path))
    with pytest.raises(ValueError):
        store.save("r", 1, {bad: torch.zeros(1)}, {})
    assert store.steps("r") == []


def test_array_that_is_also_a_group_is_rejected(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    with pytest.raises(ValueError, match="both an array and a group"):
        store.save("r", 1, {"a": torch.zeros(1), "a/b": torch.zeros(1)}, {})


def test_bad_run_ids_steps_metadata_and_dtypes_are_rejected(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    for run in ["", ".hidden", "a/b", "../x"]:
        with pytest.raises(ValueError):
            store.save(run, 1, {"w": torch.zeros(1)}, {})
    with pytest.raises(ValueError):
        store.save("r", -1, {"w": torch.zeros(1)}, {})
    with pytest.raises(ValueError, match="JSON"):
        store.save("r", 1, {"w": torch.zeros(1)}, {"x": object()})
    with pytest.raises(ValueError, match="unsupported dtype"):
        store.save("r", 1, {"w": torch.zeros(1, dtype=torch.complex64)}, {})
    assert store.runs() == []


def test_run_level_json_documents(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    assert store.read_json("r", "config", default={}) == {}
    store.write_json("r", "config", {"lr": 1e-3})
    store.write_json("r", "config", {"lr": 2e-3})
    assert store.read_json("r", "config") == {"lr": 2e-3}
    assert store.create_json_exclusive("r", "chaos/raise@300", {"fired": True}) is True
    assert store.create_json_exclusive("r", "chaos/raise@300", {"fired": False}) is False
    assert store.read_json("r", "chaos/raise@300") == {"fired": True}
    assert store.runs() == ["r"]
    store.delete_run("r")
    assert store.runs() == [] and store.read_json("r", "config") is None
    with pytest.raises(ValueError):
        store.write_json("r", "../escape", {})
    assert not any(p.name.startswith(".") for p in tmp_path.rglob("*"))  # no temp files left


def test_reads_of_missing_things_raise_not_found(tmp_path: Path) -> None:
    from storage import CheckpointNotFoundError

    store = open_store(str(tmp_path / "nowhere"))
    assert store.runs() == [] and store.steps("r") == []
    with pytest.raises(CheckpointNotFoundError):
        store.load("r", 1)
    with pytest.raises(CheckpointNotFoundError):
        store.read_metadata("r", 1)
    assert store.load_latest_verified("r") is None


def test_unique_names_in_one_store_do_not_interfere(tmp_path: Path) -> None:
    store = open_store(str(tmp_path))
    runs = [uuid.uuid4().hex[:8] for _ in range(3)]
    for i, run in enumerate(runs):
        store.save(run, i, {"w": torch.full((3,), float(i))}, {"i": i})
    assert store.runs() == sorted(runs)
    for i, run in enumerate(runs):
        assert store.load(run, i).tensors["w"][0].item() == float(i)
