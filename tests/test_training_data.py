"""Corpus loading and batching: data order is a pure function of (seed, epoch)."""

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from training.data import (
    Corpus,
    DataCursor,
    DataError,
    batches_per_epoch,
    get_batch,
    get_eval_batches,
    load_corpus,
)


@pytest.fixture(scope="module")
def stdlib() -> Corpus:
    return load_corpus(None)


@pytest.fixture
def counting(tmp_path: Path) -> Corpus:
    # Every token is its own position, so a batch row reveals exactly where it was cut from.
    path = tmp_path / "count.bin"
    np.arange(4000, dtype=np.uint16).tofile(path)
    return load_corpus(path, val_fraction=0.1)


def test_default_corpus_is_the_stdlib_source(stdlib: Corpus):
    started = time.perf_counter()
    again = load_corpus(None)
    # No timing assertion (machines vary): the number is printed for people (pytest -s).
    print(f"stdlib corpus load {time.perf_counter() - started:.3f}s: {again.description}")
    assert again.fingerprint == stdlib.fingerprint  # stable across loads
    assert "standard library" in stdlib.description
    assert stdlib.train.dtype == np.uint8 and stdlib.vocab_size == 256
    assert stdlib.train.size > 5 * 2**20
    assert 0.04 < stdlib.val.size / (stdlib.train.size + stdlib.val.size) < 0.06
    text = stdlib.train[: 2**20].tobytes()
    assert b"def " in text and b"import " in text
    assert load_corpus(None, val_fraction=0.1).fingerprint != stdlib.fingerprint


def test_text_folder_sorted_recursive_skipping_binary_and_hidden(tmp_path: Path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "b" / "two.txt").write_bytes(b"second file\n" * 20)
    (tmp_path / "a.txt").write_bytes(b"first file\n" * 20)
    (tmp_path / "blob.dat").write_bytes(b"\x00\x01binary")
    (tmp_path / ".git" / "config").write_bytes(b"hidden\n")
    corpus = load_corpus(tmp_path)
    everything = np.concatenate([corpus.train, corpus.val]).tobytes()
    assert everything == b"first file\n" * 20 + b"second file\n" * 20
    assert corpus.vocab_size == 256 and "2 text files" in corpus.description
    before = corpus.fingerprint
    (tmp_path / "a.txt").write_bytes(b"First file\n" * 20)  # same size, other content
    assert load_corpus(tmp_path).fingerprint != before


def test_single_text_file(tmp_path: Path):
    path = tmp_path / "one.txt"
    path.write_bytes(bytes(range(32, 127)) * 10)
    corpus = load_corpus(str(path))
    assert corpus.train.size + corpus.val.size == 950 and corpus.val.size == 47


def test_token_bin_file_and_folder(tmp_path: Path):
    tokens = np.array([5, 700, 65535, 3] * 100, dtype=np.uint16)
    tokens.tofile(tmp_path / "data.bin")
    corpus = load_corpus(tmp_path / "data.bin")
    assert corpus.train.dtype == np.uint16 and corpus.vocab_size == 65536
    assert np.array_equal(np.concatenate([corpus.train, corpus.val]), tokens)

    folder = tmp_path / "nano"
    folder.mkdir()
    np.array([1, 2, 3, 4] * 50, dtype=np.uint16).tofile(folder / "train.bin")
    np.array([9, 8] * 40, dtype=np.uint16).tofile(folder / "val.bin")
    nano = load_corpus(folder)
    assert nano.train.size == 200 and nano.val.size == 80 and nano.vocab_size == 10


def test_missing_or_empty_data_raises_data_error_naming_path(tmp_path: Path):
    missing = tmp_path / "nowhere" / "data.txt"
    with pytest.raises(DataError, match=str(missing)):
        load_corpus(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="empty"):
        load_corpus(empty)
    assert issubclass(DataError, ValueError)
    (tmp_path / "small.txt").write_bytes(b"x" * 500)
    small = load_corpus(tmp_path / "small.txt")
    with pytest.raises(DataError, match="too small"):
        batches_per_epoch(small, batch_size=8, block_size=64)


def test_batch_is_pure_function_of_seed_and_cursor(stdlib: Corpus):
    cursor = DataCursor(0, 17)
    x1, y1, n1 = get_batch(stdlib, cursor, seed=1, batch_size=4, block_size=32)
    x2, y2, n2 = get_batch(stdlib, cursor, seed=1, batch_size=4, block_size=32)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and n1 == n2 == DataCursor(0, 18)
    assert x1.dtype == y1.dtype == torch.int64 and x1.shape == (4, 32)
    assert torch.equal(x1[:, 1:], y1[:, :-1])  # targets are the inputs shifted by one
    other_seed, _, _ = get_batch(stdlib, cursor, seed=2, batch_size=4, block_size=32)
    other_epoch, _, _ = get_batch(stdlib, DataCursor(1, 17), seed=1, batch_size=4, block_size=32)
    assert not torch.equal(x1, other_seed) and not torch.equal(x1, other_epoch)


def test_epoch_is_a_permutation_of_non_overlapping_sequences(counting: Corpus):
    batch, block = 4, 16
    n = batches_per_epoch(counting, batch, block)
    cursor, starts = DataCursor(0, 0), []
    for _ in range(n):
        x, y, cursor = get_batch(counting, cursor, seed=7, batch_size=batch, block_size=block)
        assert torch.equal(x, x[:, :1] + torch.arange(block))  # contiguous slices of the data
        assert torch.equal(y, x + 1)
        starts += x[:, 0].tolist()
    assert cursor == DataCursor(1, 0)  # rolled over to the next epoch
    assert len(set(starts)) == len(starts) == n * batch
    assert len({s % block for s in starts}) == 1  # one alignment per epoch, block apart
    assert starts != sorted(starts)  # shuffled
    x_next, _, _ = get_batch(counting, cursor, seed=7, batch_size=batch, block_size=block)
    assert not torch.equal(x_next[:, 0], torch.tensor(starts[:batch]))  # a new order
    with pytest.raises(ValueError, match="past the end"):
        get_batch(counting, DataCursor(0, n), seed=7, batch_size=batch, block_size=block)


def test_eval_batches_fixed_and_from_val(counting: Corpus):
    first = get_eval_batches(counting, n_batches=3, batch_size=2, block_size=8)
    again = get_eval_batches(counting, n_batches=3, batch_size=2, block_size=8)
    assert len(first) == 3
    for (x, y), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x, x2) and torch.equal(y, y2) and x.shape == (2, 8)
        assert int(x.min()) >= counting.train.size  # counting tokens: val holds the tail
    with pytest.raises(DataError, match="validation split"):
        get_eval_batches(counting, 1, 1, block_size=counting.val.size)
