"""Incremental saves (issue 11): a chunk equal to the same chunk of the previous committed
checkpoint is linked (local) or copied (fsspec), not written again; readers, verify and gc never
notice, and a rotten older file is never taken over."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from storage_helpers import SMALL_CHUNK, chunk_files, flip_byte, numpy_state

from storage import open_store
from training.config import TrainConfig
from training.data import load_corpus
from training.loop import Trainer

CHANGED = "model/layer0.weight"


# These tests count chunks of single arrays, so every tensor is stored alone (pack_bytes=0);
# packs under incremental saves: test_storage_packing.py.


def _next_state(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The same state with one array changed: a training step of a model with one free layer."""
    out = dict(state)
    out[CHANGED] = state[CHANGED] + 1.0
    return out


def _nbytes(state: dict[str, np.ndarray], names: list[str]) -> int:
    return sum(state[n].nbytes for n in names)


def _loaded(store, run: str, step: int) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in store.load(run, step).tensors.items()}


def test_unchanged_chunks_are_linked_and_survive_the_older_checkpoint(tmp_path: Path) -> None:
    store = open_store(str(tmp_path), chunk_bytes=SMALL_CHUNK, incremental=True, pack_bytes=0)
    first = numpy_state(1)
    store.save("r", 1, first, {})
    second = _next_state(first)
    store.save("r", 2, second, {})
    stats = store.last_save_stats
    assert stats.bytes_written == _nbytes(second, [CHANGED])  # only the changed array
    assert stats.bytes_reused == _nbytes(second, [n for n in second if n != CHANGED])
    # The unchanged files are the first checkpoint's inodes: no bytes moved.
    files2 = chunk_files(tmp_path, "r", 2)
    changed = [p for p in files2 if f"/{CHANGED}/" in p.as_posix()]
    assert changed and all(p.stat().st_nlink == 1 for p in changed)
    assert all(p.stat().st_nlink == 2 for p in files2 if p not in changed)
    # gc of the older checkpoint leaves the newer one whole (and readers never knew).
    assert store.gc("r", keep_last=1) == [1]
    assert store.verify("r", 2).ok
    loaded = _loaded(store, "r", 2)
    for name, arr in second.items():
        np.testing.assert_array_equal(loaded[name], arr, err_msg=name)


def test_a_rotten_older_chunk_is_written_anew_not_linked(tmp_path: Path) -> None:
    store = open_store(str(tmp_path), chunk_bytes=SMALL_CHUNK, incremental=True, pack_bytes=0)
    first = numpy_state(2)
    store.save("r", 1, first, {})
    [victim, *_] = [p for p in chunk_files(tmp_path, "r", 1) if "layer3.weight" in str(p)]
    flip_byte(victim, 100)
    second = _next_state(first)
    store.save("r", 2, second, {})
    fresh = chunk_files(tmp_path, "r", 2)[chunk_files(tmp_path, "r", 1).index(victim)]
    assert fresh.name == victim.name and fresh.stat().st_nlink == 1
    assert store.verify("r", 2).ok and not store.verify("r", 1).ok


def test_one_file_is_shared_by_at_most_max_sharing_checkpoints(tmp_path: Path) -> None:
    store = open_store(str(tmp_path), chunk_bytes=SMALL_CHUNK, incremental=True, max_sharing=2, pack_bytes=0)
    frozen = numpy_state(3)
    for step in range(1, 6):
        store.save("r", step, frozen, {})
    # Linked into one more checkpoint, then written anew: steps (1,2), (3,4), (5).
    nlinks = [{p.stat().st_nlink for p in chunk_files(tmp_path, "r", s)} for s in range(1, 6)]
    assert nlinks == [{2}, {2}, {2}, {2}, {1}]
    [victim, *_] = [p for p in chunk_files(tmp_path, "r", 4) if "layer3.weight" in str(p)]
    flip_byte(victim, 100)
    # The rot took step 4 and the one step sharing its file, not further back.
    assert [store.verify("r", s).ok for s in range(1, 6)] == [True, True, False, False, True]
    store.save("r", 6, frozen, {})  # step 5's file is whole: linked, rot never spreads
    assert store.verify("r", 6).ok


def test_incremental_saves_are_off_by_default(tmp_path: Path) -> None:
    # A linked file is one inode for two checkpoints: rot in it would take both.
    store = open_store(str(tmp_path), chunk_bytes=SMALL_CHUNK)
    first = numpy_state(3)
    store.save("r", 1, first, {})
    store.save("r", 2, _next_state(first), {})
    assert store.last_save_stats.bytes_reused == 0
    assert all(p.stat().st_nlink == 1 for p in chunk_files(tmp_path, "r", 2))


def test_fsspec_stores_copy_unchanged_chunks() -> None:
    url = f"memory://incremental-{os.getpid()}"
    store = open_store(url, chunk_bytes=SMALL_CHUNK, incremental=True, pack_bytes=0)
    try:
        first = numpy_state(4)
        store.save("r", 1, first, {})
        second = _next_state(first)
        store.save("r", 2, second, {})
        assert store.last_save_stats.bytes_written == _nbytes(second, [CHANGED])
        assert store.gc("r", keep_last=1) == [1]
        loaded = _loaded(store, "r", 2)
        for name, arr in second.items():
            np.testing.assert_array_equal(loaded[name], arr, err_msg=name)
    finally:
        store.delete_run("r")


def test_data_parallel_shares_link_unchanged_chunks(tmp_path: Path) -> None:
    store = open_store(str(tmp_path), chunk_bytes=SMALL_CHUNK, incremental=True, pack_bytes=0)
    first = numpy_state(5)
    store.save("r", 1, first, {})
    second = _next_state(first)
    receipts = [store.write_share("r", 2, second, session="s", rank=rank, world_size=2)
                for rank in range(2)]
    store.commit_shares("r", 2, receipts, {}, session="s")
    assert sum(r.bytes_written for r in receipts) == _nbytes(second, [CHANGED])
    assert store.verify("r", 2).ok


def test_fine_tuning_one_layer_writes_only_that_layer(tmp_path: Path) -> None:
    """Real training with every layer frozen but one (a block's attention projection): each
    later checkpoint writes that layer's weights and optimizer moments (and the few scalars
    that move every step); the frozen rest is linked."""
    text = Path(json.__file__).read_bytes()[:20000]
    (tmp_path / "corpus.txt").write_bytes(text)
    corpus = load_corpus(tmp_path / "corpus.txt")
    trainer = Trainer(TrainConfig(model="tiny", steps=6, torch_threads=1).resolved(), corpus)
    free = "transformer.h.1.attn.c_proj."
    for name, param in trainer.model.named_parameters():
        param.requires_grad_(name.startswith(free))
    store = open_store(str(tmp_path / "store"), chunk_bytes=SMALL_CHUNK, incremental=True)
    written: list[int] = []
    for step in range(1, 5):
        trainer.train_step()
        tensors, meta = trainer.capture()
        store.save("ft", step, tensors, meta)
        written.append(store.last_save_stats.bytes_written)
    tensors, _ = trainer.capture()
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    free_params = sum(p.numel() * p.element_size() for n, p in trainer.model.named_parameters()
                      if n.startswith(free))
    moving = free_params * 3  # the weights and AdamW's two moments
    # The first save has nothing to link; with the default cap of 3 sharers, every third save
    # writes the frozen rest anew too (a rotten file takes at most 3 checkpoints).
    full, incremental = written[0::3], written[1::3] + written[2::3]
    assert full and all(w == pytest.approx(total, rel=0.05) for w in full), written
    for later in incremental:
        assert moving <= later < moving + 64 * 1024, (later, moving, total)
    assert moving < total / 3  # so the assertion above is about something
    restored = Trainer(TrainConfig(model="tiny", steps=6, torch_threads=1).resolved(), corpus)
    loaded = store.load("ft", 4)
    restored.restore(dict(loaded.tensors), loaded.metadata)
    for name, tensor in restored.capture()[0].items():
        assert torch.equal(tensor, tensors[name]), name
