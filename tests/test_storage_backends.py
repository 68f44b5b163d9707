"""One conformance suite, run against every backend (zarr's StoreTests idea): a local folder
and fsspec's memory://."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta

import fsspec
import numpy as np
import pytest
import torch
import zarr
from storage_helpers import assert_same_tensors, zarr_tensor

from storage import (
    CheckpointNotFoundError,
    CheckpointStore,
    CorruptCheckpointError,
    open_store,
    state_hash,
)


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model/emb": torch.randn(33, 8, generator=g),
        "model/ln.bias": torch.randn(8, generator=g).bfloat16(),
        "optim/state/0/step": torch.tensor(seed, dtype=torch.int64),
        "optim/state/0/mask": torch.rand(5, generator=g) > 0.5,
        "empty": torch.empty(0, 3),
    }


class StoreConformance:
    """Behaviour every backend must have; subclasses provide the ``store`` fixture."""

    url: str

    def _chunk_path(self, store: CheckpointStore, step: int, rel: str) -> str:
        return f"r/ckpt/{step:012d}/{rel}"

    def _overwrite(self, store: CheckpointStore, rel: str, data: bytes) -> None:
        store.backend.write_atomic(rel, data)

    def test_save_load_round_trip(self, store: CheckpointStore) -> None:
        state = _state(1)
        ref = store.save("r", 1, state, {"step": 1})
        got = store.load("r", 1)
        assert got.ref == ref and got.metadata == {"step": 1}
        assert_same_tensors(got.tensors, state)
        assert store.state_hash("r", 1) == state_hash(state)

    def test_listing(self, store: CheckpointStore) -> None:
        assert store.runs() == [] and store.steps("r") == []
        for s in (30, 10, 20):
            store.save("r", s, _state(s), {})
        store.save("other", 1, _state(1), {})
        assert store.steps("r") == [10, 20, 30]
        assert store.runs() == ["other", "r"]

    def test_not_found(self, store: CheckpointStore) -> None:
        with pytest.raises(CheckpointNotFoundError):
            store.load("r", 1)
        assert store.load_latest_verified("r") is None

    def test_idempotent_save(self, store: CheckpointStore) -> None:
        ref = store.save("r", 1, _state(1), {})
        assert store.save("r", 1, _state(1), {}) == ref
        assert store.last_save_stats.outcome == "existing"

    def test_flipped_chunk_is_named_and_latest_falls_back(self, store: CheckpointStore) -> None:
        store.save("r", 1, _state(1), {})
        store.save("r", 2, _state(2), {})
        # model/emb is small enough to be packed: the error names the pack array holding it.
        array = store.read_manifest("r", 2)[0].array_of("model/emb")
        assert array == "_packed/float32"
        rel = self._chunk_path(store, 2, f"{array}/c/0")
        data = bytearray(store.backend.read_bytes(rel))
        data[5] ^= 1
        self._overwrite(store, rel, bytes(data))
        with pytest.raises(CorruptCheckpointError) as ei:
            store.load("r", 2)
        assert (ei.value.array, ei.value.chunk) == (array, "c/0")
        seen: list[CorruptCheckpointError] = []
        assert store.load_latest_verified("r", on_corrupt=seen.append).ref.step == 1
        assert [e.step for e in seen] == [2]

    def test_marker_is_what_makes_a_step_visible(self, store: CheckpointStore) -> None:
        store.save("r", 1, _state(1), {})
        store.backend.remove_tree("r/ckpt/000000000001/COMMITTED")
        assert store.steps("r") == []
        with pytest.raises(CorruptCheckpointError, match="marker"):
            store.load("r", 1)

    def test_gc_keeps_newest_verified(self, store: CheckpointStore) -> None:
        for s in range(1, 6):
            store.save("r", s, _state(s), {})
        rel = self._chunk_path(store, 5, "optim/state/0/step/c")
        self._overwrite(store, rel, b"\0" * 8)
        assert store.gc("r", keep_last=1) == [1, 2, 3]
        assert store.steps("r") == [4, 5]
        assert store.load_latest_verified("r").ref.step == 4

    def test_json_documents(self, store: CheckpointStore) -> None:
        store.write_json("r", "config", {"a": 1})
        assert store.read_json("r", "config") == {"a": 1}
        assert store.read_json("r", "nope", default=5) == 5
        assert store.create_json_exclusive("r", "chaos/kill-worker@3", {"n": 1})
        assert not store.create_json_exclusive("r", "chaos/kill-worker@3", {"n": 2})
        assert store.read_json("r", "chaos/kill-worker@3") == {"n": 1}
        store.delete_run("r")
        assert store.read_json("r", "config") is None

    def test_stale_staging_is_reused_then_cleaned(self, store: CheckpointStore) -> None:
        state = _state(9)
        # A writer that died after writing its chunks: stage, never commit.
        first = open_store(store.url, chunk_bytes=store.config.chunk_bytes)
        staging = first.backend.begin_staging("r/ckpt", ".staging-000000000009-")
        from storage.writer import SaveStats, write_staging

        write_staging(first.backend, staging, "r", 9, "r/ckpt", "000000000009", state, {}, 64, SaveStats(),
                      pack_bytes=first.config.pack_bytes)
        staging.abandon()
        store.save("r", 9, state, {})
        stats = store.last_save_stats
        assert stats.bytes_written == 0 and stats.chunks_reused > 0
        assert_same_tensors(store.load("r", 9).tensors, state)
        store.gc("r", keep_last=1)
        assert not [n for n in store.backend.list_dir("r/ckpt") if n.startswith(".staging-")]

    def test_zarr_python_reads_it(self, store: CheckpointStore) -> None:
        state = _state(3)
        store.save("r", 3, state, {"m": 1})
        group = self._zarr_group(store, 3)
        assert group.attrs["metadata"] == {"m": 1}
        emb, dtype = zarr_tensor(group, "model/emb")
        assert np.array_equal(emb, state["model/emb"].numpy()) and dtype == "float32"
        bias, dtype = zarr_tensor(group, "model/ln.bias")
        assert bias.tobytes() == state["model/ln.bias"].view(torch.uint16).numpy().tobytes() and dtype == "bfloat16"
        assert zarr_tensor(group, "empty")[0].shape == (0, 3)
        assert "model/emb" not in group and "_packed/float32" in group  # packed, as the recipe expects

    def _zarr_group(self, store: CheckpointStore, step: int) -> zarr.Group:
        raise NotImplementedError


class TestLocalStore(StoreConformance):
    @pytest.fixture
    def store(self, tmp_path) -> CheckpointStore:
        return open_store(str(tmp_path), chunk_bytes=64, staging_grace=timedelta(0))

    def _zarr_group(self, store: CheckpointStore, step: int) -> zarr.Group:
        return zarr.open_group(f"{store.url}/r/ckpt/{step:012d}", mode="r")


class TestMemoryStore(StoreConformance):
    @pytest.fixture
    def store(self) -> Iterator[CheckpointStore]:
        name = f"memory://t{uuid.uuid4().hex}"
        yield open_store(name, chunk_bytes=64, remote_stale_after=timedelta(0))
        fs = fsspec.filesystem("memory")
        if fs.exists(name.removeprefix("memory://")):
            fs.rm(name.removeprefix("memory://"), recursive=True)

    def _zarr_group(self, store: CheckpointStore, step: int) -> zarr.Group:
        from zarr.storage import FsspecStore

        return zarr.open_group(FsspecStore.from_url(f"{store.url}/r/ckpt/{step:012d}", read_only=True), mode="r")

    def test_marker_is_written_last(self, store: CheckpointStore, monkeypatch) -> None:
        order: list[str] = []
        fs = store.backend.fs
        real_copy, real_pipe = fs.copy, fs.pipe_file
        monkeypatch.setattr(fs, "copy", lambda a, b, **k: (order.append(b), real_copy(a, b, **k))[1])
        monkeypatch.setattr(fs, "pipe_file", lambda p, d, **k: (order.append(p), real_pipe(p, d, **k))[1])
        store.save("r", 1, _state(1), {})
        finals = [p for p in order if "/ckpt/000000000001/" in p]
        assert finals[-1].endswith("/COMMITTED") and sum(p.endswith("COMMITTED") for p in finals) == 1
