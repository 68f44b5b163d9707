"""Training data: load a corpus, cut it into batches in a seeded order, fixed held-out batches.

A corpus is one flat array of token ids: bytes (uint8, vocab 256) for text, or uint16 tokens for
nanoGPT-style `.bin` files. The data order is a pure function of (seed, epoch) and the position in
an epoch lives in a DataCursor, which is checkpointed: a resumed run reads exactly the batches the
uninterrupted one would have.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from training.rng import DATA_STREAM, derive_seed

if TYPE_CHECKING:
    import torch

STDLIB_MAX_BYTES = 32 * 2**20
"""Cap on the default corpus, in sorted file order, so loading stays well under 2 s."""
_STDLIB_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_BINARY_SNIFF_BYTES = 8192


class DataError(ValueError):
    """The data cannot be used: missing path, no text, too small. A configuration error."""


@dataclass(frozen=True)
class DataCursor:
    """Where the next batch comes from: `position` indexes this epoch's batch order."""

    epoch: int
    """Completed passes over the training split."""
    position: int
    """Index of the next batch within the epoch's (seeded) batch order."""

    def __post_init__(self) -> None:
        for name in ("epoch", "position"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"DataCursor.{name} must be an integer >= 0, got {value!r}")


@dataclass(frozen=True, eq=False)
class Corpus:
    """Token ids split into train and held-out val, with a fingerprint of where they came from."""

    train: np.ndarray
    """Training token ids (uint8 bytes or uint16 tokens), 1-D; may be a read-only memmap."""
    val: np.ndarray
    """Held-out token ids, same dtype."""
    vocab_size: int
    """256 for bytes; max token + 1 for tokens."""
    fingerprint: str
    """Stable hash of file names, sizes, contents and the split: same data, same fingerprint."""
    description: str
    """One line for people: what was loaded."""


# ---------------------------------------------------------------------------- loading


def load_corpus(path: str | os.PathLike[str] | None, val_fraction: float = 0.05) -> Corpus:
    """Load a corpus from `path`; None means the Python standard library's own source.

    path may be a text file, a folder of text files (recursive, sorted, binary files and hidden
    entries skipped), a folder holding nanoGPT's train.bin (and val.bin), or one uint16 `.bin`.
    Text is read as bytes. Without a separate val.bin, the last `val_fraction` is held out.

    Raises:
        DataError: the path is missing or holds no usable data; the message names the path.
    """
    if not 0.0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction!r}")
    if path is None:
        root = Path(sysconfig.get_paths()["stdlib"])
        files = _stdlib_files(root)
        version = ".".join(map(str, sys.version_info[:3]))
        return _text_corpus(root, files, val_fraction, f"Python {version} standard library")
    p = Path(path).expanduser()
    if not p.exists():
        raise DataError(f"data path not found: {path}")
    if p.is_file() and p.suffix == ".bin":
        return _token_corpus([p], val_fraction, str(path))
    if p.is_file():
        return _text_corpus(p.parent, [p], val_fraction, str(path))
    if (p / "train.bin").is_file():
        bins = [p / "train.bin"] + ([p / "val.bin"] if (p / "val.bin").is_file() else [])
        return _token_corpus(bins, val_fraction, str(path))
    return _text_corpus(p, _text_files(p), val_fraction, str(path))


def _stdlib_files(root: Path) -> list[Path]:
    files: list[Path] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _STDLIB_SKIP_DIRS]  # prune in place: os.walk obeys
        files += [Path(folder, n) for n in names if n.endswith(".py")]
    files.sort(key=lambda f: f.relative_to(root).as_posix())
    kept, total = [], 0
    for f in files:
        size = f.stat().st_size
        if total + size > STDLIB_MAX_BYTES:
            break
        kept.append(f)
        total += size
    return kept


def _text_files(folder: Path) -> list[Path]:
    found = []
    for f in folder.rglob("*"):
        rel = f.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or "__pycache__" in rel.parts:
            continue
        if f.is_file() and not _looks_binary(f):
            found.append(f)
    return sorted(found, key=lambda f: f.relative_to(folder).as_posix())


def _looks_binary(f: Path) -> bool:
    # The heuristic git and grep use: a NUL byte near the start means "not text".
    with open(f, "rb") as fh:
        return b"\0" in fh.read(_BINARY_SNIFF_BYTES)


def _text_corpus(root: Path, files: list[Path], val_fraction: float, where: str) -> Corpus:
    parts = [f.read_bytes() for f in files]
    data = np.frombuffer(b"".join(parts), dtype=np.uint8)
    if data.size == 0:
        raise DataError(f"no text found in {where}")
    listing = [(f.relative_to(root).as_posix(), len(b)) for f, b in zip(files, parts, strict=True)]
    fingerprint = _fingerprint("bytes", listing, [data], val_fraction)
    train, val = _split(data, val_fraction, where)
    desc = f"{where}: {len(files)} text files, {data.size / 2**20:.1f} MiB of bytes"
    return Corpus(train, val, 256, fingerprint, desc)


def _token_corpus(bins: list[Path], val_fraction: float, where: str) -> Corpus:
    arrays = [np.memmap(b, dtype=np.uint16, mode="r") for b in bins]
    if any(a.size == 0 for a in arrays):
        raise DataError(f"empty token file in {where}")
    listing = [(b.name, b.stat().st_size) for b in bins]
    fingerprint = _fingerprint("uint16", listing, arrays, val_fraction if len(bins) == 1 else 0.0)
    train, val = arrays if len(bins) == 2 else _split(arrays[0], val_fraction, where)
    vocab_size = int(max(train.max(), val.max())) + 1
    n_tokens = sum(a.size for a in arrays)
    desc = f"{where}: {n_tokens:,} uint16 tokens, vocab {vocab_size}"
    return Corpus(train, val, vocab_size, fingerprint, desc)


def _split(data: np.ndarray, val_fraction: float, where: str) -> tuple[np.ndarray, np.ndarray]:
    n_val = int(data.size * val_fraction)
    if n_val < 2 or data.size - n_val < 2:
        raise DataError(f"too little data in {where} to hold out a validation split")
    return data[: data.size - n_val], data[data.size - n_val :]


def _fingerprint(
    kind: str, listing: list[tuple[str, int]], arrays: list[np.ndarray], val_fraction: float
) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(repr((kind, listing, val_fraction)).encode())
    for a in arrays:
        h.update(memoryview(np.ascontiguousarray(a)).cast("B"))
    return h.hexdigest()


# ---------------------------------------------------------------------------- batching


def _sequences_per_epoch(corpus: Corpus, block_size: int) -> int:
    # Each sequence spans block_size + 1 tokens (inputs plus the next-token targets). Starts sit
    # block_size apart after a per-epoch shift below block_size; leaving one block of slack keeps
    # the count the same for every shift, so every epoch has the same number of batches.
    return max(0, (corpus.train.size - block_size) // block_size)


def batches_per_epoch(
    corpus: Corpus, batch_size: int, block_size: int, epoch_steps: int | None = None
) -> int:
    """Batches in one epoch: a full pass over the training split (a partial last batch is
    dropped), or the first epoch_steps batches of that epoch's seeded order when it is shorter.

    Raises:
        DataError: the training split cannot fill even one batch.
    """
    n = _sequences_per_epoch(corpus, block_size) // batch_size
    if n < 1:
        raise DataError(
            f"{corpus.description}: training split ({corpus.train.size} tokens) is too small "
            f"for one batch of {batch_size} x {block_size + 1} tokens"
        )
    return n if epoch_steps is None else min(n, epoch_steps)


@functools.lru_cache(maxsize=4)
def _epoch_order(
    seed: int, epoch: int, n_sequences: int, block_size: int
) -> tuple[np.ndarray, int]:
    # Cached: the permutation is the same for every batch of an epoch and costs milliseconds.
    rng = np.random.default_rng(derive_seed(seed, DATA_STREAM, epoch))
    shift = int(rng.integers(block_size))  # a new alignment each epoch: other token boundaries
    order = rng.permutation(n_sequences)
    order.flags.writeable = False  # shared through the cache: nobody may change it
    return order, shift


def get_batch(
    corpus: Corpus,
    cursor: DataCursor,
    seed: int,
    batch_size: int,
    block_size: int,
    epoch_steps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, DataCursor]:
    """The batch at `cursor` and the cursor after it.

    The epoch's order is a seeded permutation of non-overlapping sequence starts, a pure function
    of (seed, epoch). Returns inputs x and targets y, int64 (batch_size, block_size), y shifted
    one token ahead of x. At the end of an epoch the next cursor is (epoch + 1, 0).
    """
    n_batches = batches_per_epoch(corpus, batch_size, block_size, epoch_steps)
    if cursor.position >= n_batches:
        raise ValueError(
            f"cursor position {cursor.position} is past the end of the epoch ({n_batches} batches)"
        )
    order, shift = _epoch_order(
        seed, cursor.epoch, _sequences_per_epoch(corpus, block_size), block_size
    )
    import torch  # the coordinator plans epochs with this module and never makes a batch

    picked = order[cursor.position * batch_size : (cursor.position + 1) * batch_size]
    starts = shift + picked.astype(np.int64) * block_size
    tokens = torch.from_numpy(
        corpus.train[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)
    )
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    if cursor.position + 1 < n_batches:
        nxt = DataCursor(cursor.epoch, cursor.position + 1)
    else:
        nxt = DataCursor(cursor.epoch + 1, 0)
    return x, y, nxt


def get_eval_batches(
    corpus: Corpus, n_batches: int, batch_size: int, block_size: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed held-out batches: n_batches * batch_size sequences spread evenly over val.

    No randomness at all, so every evaluation of every run on this corpus sees the same tokens.

    Raises:
        DataError: the validation split is shorter than one sequence.
    """
    span = corpus.val.size - (block_size + 1)
    if span < 0:
        raise DataError(
            f"{corpus.description}: validation split ({corpus.val.size} tokens) is shorter "
            f"than one sequence of {block_size + 1} tokens"
        )
    import torch

    starts = np.linspace(0, span, n_batches * batch_size).round().astype(np.int64)
    tokens = torch.from_numpy(
        corpus.val[starts[:, None] + np.arange(block_size + 1)].astype(np.int64)
    )
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    return list(zip(x.split(batch_size), y.split(batch_size), strict=True))


def steps_per_epoch(corpus: Corpus, cfg: Any) -> int:
    """Optimizer steps in one epoch of a resolved config (one batch per step)."""
    return batches_per_epoch(corpus, cfg.batch_size, cfg.block_size, cfg.epoch_steps)
