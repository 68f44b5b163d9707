"""xxh3-128 hashing: per-chunk hashes and the checkpoint-wide ``state_hash`` (DESIGN.md §2)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import xxhash

_STATE_TAG = b"rebound-state-v1\0"


def bytes_hash(data: bytes | memoryview) -> str:
    """xxh3-128 hex digest of a byte string (chunks, manifests)."""
    return xxhash.xxh3_128_hexdigest(data)


class StateHasher:
    """Incremental state_hash: tensors fed in sorted name order, bytes in any number of pieces.

    Each tensor contributes ``name \\0 dtype \\0 shape \\0`` then its raw little-endian bytes;
    shape and dtype fix the byte length, so the stream is unambiguous.
    """

    def __init__(self) -> None:
        self._h = xxhash.xxh3_128(_STATE_TAG)
        self._last: str | None = None

    def begin(self, name: str, dtype: str, shape: tuple[int, ...] | list[int]) -> None:
        """Start the next tensor; names must come in strictly ascending order."""
        if self._last is not None and name <= self._last:
            raise ValueError(f"state_hash needs names in sorted order: {name!r} after {self._last!r}")
        self._last = name
        dims = ",".join(str(int(d)) for d in shape)
        self._h.update(f"{name}\0{dtype}\0{dims}\0".encode())

    def update(self, data: bytes | memoryview) -> None:
        """Feed raw bytes of the current tensor."""
        self._h.update(data)

    def hexdigest(self) -> str:
        """The hash of everything fed so far."""
        return self._h.hexdigest()


def state_hash(tensors: Mapping[str, Any]) -> str:
    """xxh3-128 hex over tensors in sorted name order (name, dtype, shape, raw bytes).

    Accepts torch tensors (any device, any strides) and numpy arrays; the value equals
    ``CheckpointStore.state_hash`` of a checkpoint saved from the same tensors.
    """
    from storage.tensors import host_bytes

    h = StateHasher()
    for name in sorted(tensors):
        hb = host_bytes(tensors[name])
        h.begin(name, hb.dtype, hb.shape)
        h.update(hb.data)
    return h.hexdigest()
