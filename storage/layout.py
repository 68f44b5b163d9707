"""Where a tensor's bytes go: chunking along axis 0 and the Zarr v3 metadata documents.

Every chunk is a contiguous slice of the tensor's memory (rows ``[i*r, (i+1)*r)``), so it can be
written straight from the tensor without a copy. Zarr v3 stores edge chunks at full chunk
shape, so the last chunk is padded with fill-value zeros; the number of chunks is chosen first
and rows spread evenly, which keeps that padding under one row per chunk.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from storage.dtypes import DType

ZARR_JSON = "zarr.json"


@dataclass(frozen=True)
class ChunkSpec:
    """One chunk file of an array.

    Attributes:
        key: chunk key relative to the array folder (``c/3/0``; ``c`` for a 0-d array).
        start: offset of the chunk's first byte in the tensor's flat bytes.
        data_nbytes: bytes of tensor data in the chunk.
        nbytes: bytes stored in the file (data plus zero padding of an edge chunk).
    """

    key: str
    start: int
    data_nbytes: int
    nbytes: int


@dataclass(frozen=True)
class ArrayLayout:
    """An array's shape, dtype and chunk files."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    chunks: tuple[ChunkSpec, ...]

    @property
    def data_nbytes(self) -> int:
        """Bytes of tensor data (without padding)."""
        return math.prod(self.shape) * self.dtype.itemsize


def choose_chunk_shape(shape: tuple[int, ...], itemsize: int, chunk_bytes: int) -> tuple[int, ...]:
    """Rows per chunk so chunks are near ``chunk_bytes`` and evenly sized."""
    if not shape:
        return ()
    rest = [max(1, d) for d in shape[1:]]
    if math.prod(shape) == 0:
        return (max(1, shape[0]), *rest)
    row_bytes = math.prod(shape[1:]) * itemsize
    n_chunks = min(shape[0], max(1, math.ceil(shape[0] * row_bytes / chunk_bytes)))
    return (math.ceil(shape[0] / n_chunks), *rest)


def chunk_specs(shape: tuple[int, ...], chunk_shape: tuple[int, ...], itemsize: int) -> tuple[ChunkSpec, ...]:
    """The chunk files of an array chunked along axis 0 (also used to check a manifest)."""
    if not shape:
        return (ChunkSpec("c", 0, itemsize, itemsize),)
    if math.prod(shape) == 0:
        return ()  # Zarr reads an empty array without touching any chunk
    rows = chunk_shape[0]
    row_bytes = math.prod(shape[1:]) * itemsize
    tail = "/0" * (len(shape) - 1)
    specs = []
    for i in range(math.ceil(shape[0] / rows)):
        n = min(rows, shape[0] - i * rows)
        specs.append(ChunkSpec(f"c/{i}{tail}", i * rows * row_bytes, n * row_bytes, rows * row_bytes))
    return tuple(specs)


def plan_array(name: str, dtype: DType, shape: tuple[int, ...], chunk_bytes: int) -> ArrayLayout:
    """Lay out one tensor."""
    chunk_shape = choose_chunk_shape(shape, dtype.itemsize, chunk_bytes)
    return ArrayLayout(name, dtype, shape, chunk_shape, chunk_specs(shape, chunk_shape, dtype.itemsize))


def _dumps(doc: dict) -> bytes:
    return json.dumps(doc, indent=2, allow_nan=False).encode()


def array_zarr_json(layout: ArrayLayout, packed: list[dict] | None = None) -> bytes:
    """The array's ``zarr.json``, as zarr-python 3 writes it for ``compressors=None``;
    ``packed``: the member list of a pack of small tensors (storage.packing)."""
    attributes: dict = {"dtype": layout.dtype.name}
    if packed:
        attributes["packed"] = packed
    bytes_codec: dict = {"name": "bytes"}
    if layout.dtype.itemsize > 1:
        bytes_codec["configuration"] = {"endian": "little"}
    return _dumps(
        {
            "shape": list(layout.shape),
            "data_type": layout.dtype.stored,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": list(layout.chunk_shape)}},
            "chunk_key_encoding": {"name": "default", "configuration": {"separator": "/"}},
            "fill_value": layout.dtype.fill_value,
            "codecs": [bytes_codec],
            # The true dtype: readers of a uint16 array tagged "bfloat16" view the bits as bf16.
            "attributes": attributes,
            "zarr_format": 3,
            "node_type": "array",
            "storage_transformers": [],
        }
    )


def group_zarr_json(attributes: dict | None = None) -> bytes:
    """A group's ``zarr.json``."""
    return _dumps({"attributes": attributes or {}, "zarr_format": 3, "node_type": "group"})


def subgroups(names: list[str]) -> list[str]:
    """The intermediate group paths that array names imply ('optim/state/3/x' -> 3 groups)."""
    groups: set[str] = set()
    for name in names:
        parts = name.split("/")
        for i in range(1, len(parts)):
            groups.add("/".join(parts[:i]))
    return sorted(groups)
