"""The manifest (every array, chunk, hash and the metadata) and the commit marker.

Both are JSON. The marker holds the xxh3-128 of the manifest's exact bytes, so a reader that
trusts the marker can trust the manifest, and through its hashes every chunk. A manifest read
back from disk is validated before any of its names becomes a path.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field

from storage.dtypes import DTYPES
from storage.errors import CorruptCheckpointError
from storage.hashing import bytes_hash
from storage.layout import ZARR_JSON, ArrayLayout, chunk_specs, subgroups
from storage.names import check_tree, validate_array_name
from storage.packing import Member, encode_members, is_pack_name, tensor_specs, validate_members

FORMAT = "rebound.checkpoint"
# 2: small tensors may be packed (an array entry with "packed" members). A checkpoint without
# packs is still written as 1, so readers that predate packing read it unchanged.
FORMAT_VERSION = 2
FORMAT_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
MARKER = "COMMITTED"
_HEX128 = re.compile(r"^[0-9a-f]{32}$")
# No writer makes chunk files this large (chunk_bytes is ~64 MiB): a bigger one is a forged shape.
MAX_CHUNK_BYTES = 1 << 40


@dataclass
class ArrayEntry:
    """An array in the manifest: its layout, the hash of each chunk (same order) and, for a
    pack of small tensors, the tensors it holds."""

    layout: ArrayLayout
    hashes: list[str]
    members: tuple[Member, ...] = ()


@dataclass
class Manifest:
    """Everything needed to read and verify one checkpoint."""

    run_id: str
    step: int
    metadata: dict
    arrays: list[ArrayEntry]
    documents: dict[str, str] = field(default_factory=dict)  # zarr.json path -> xxh3
    state_hash: str = ""
    created_unix: float = 0.0

    @property
    def nbytes(self) -> int:
        """Bytes stored in chunk files."""
        return sum(c.nbytes for a in self.arrays for c in a.layout.chunks)

    def by_name(self) -> dict[str, ArrayEntry]:
        """Arrays keyed by name."""
        return {a.layout.name: a for a in self.arrays}

    def tensors(self) -> list[tuple[str, str, tuple[int, ...]]]:
        """(name, dtype, shape) of every tensor, packed ones included, sorted by name."""
        return tensor_specs(
            [a.layout for a in self.arrays], {a.layout.name: a.members for a in self.arrays}
        )

    def array_of(self, tensor: str) -> str:
        """The array holding a tensor (itself, or the pack it is in)."""
        for a in self.arrays:
            if any(m.name == tensor for m in a.members):
                return a.layout.name
        return tensor


def expected_documents(names: list[str]) -> list[str]:
    """Paths of every zarr.json a checkpoint holding these arrays has."""
    return [ZARR_JSON] + [f"{g}/{ZARR_JSON}" for g in subgroups(names)] + [
        f"{n}/{ZARR_JSON}" for n in names
    ]


def encode_manifest(m: Manifest) -> bytes:
    """Serialise; arrays are kept sorted by name so equal states give equal bytes."""
    arrays = []
    for a in sorted(m.arrays, key=lambda a: a.layout.name):
        lay = a.layout
        entry = {
            "name": lay.name,
            "shape": list(lay.shape),
            "dtype": lay.dtype.name,
            "stored_dtype": lay.dtype.stored,
            "chunk_shape": list(lay.chunk_shape),
            "chunks": [
                {"key": c.key, "nbytes": c.nbytes, "xxh3_128": h}
                for c, h in zip(lay.chunks, a.hashes, strict=True)
            ],
        }
        if a.members:
            entry["packed"] = encode_members(a.members)
        arrays.append(entry)
    doc = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if any(a.members for a in m.arrays) else 1,
        "run_id": m.run_id,
        "step": m.step,
        "created_unix": m.created_unix or time.time(),
        "state_hash": m.state_hash,
        "metadata": m.metadata,
        "arrays": arrays,
        "documents": dict(sorted(m.documents.items())),
    }
    return json.dumps(doc, indent=1, allow_nan=False).encode()


def _fail(run_id: str, step: int, reason: str, array: str | None = None) -> CorruptCheckpointError:
    return CorruptCheckpointError(run_id, step, reason, array=array)


def _int_list(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in v)


def _chunk_count(shape: list[int], cshape: list[int]) -> int:
    """How many chunk files a shape has (chunk_specs' count, computed without building them)."""
    if not shape:
        return 1
    if math.prod(shape) == 0:
        return 0
    return -(-shape[0] // cshape[0])


def _decode_array(a: object, run_id: str, step: int, version: int) -> ArrayEntry:
    if not isinstance(a, dict) or not isinstance(a.get("name"), str):
        raise _fail(run_id, step, "manifest array entry without a name")
    name = a["name"]
    try:
        validate_array_name(name)
    except ValueError as e:
        raise _fail(run_id, step, f"unsafe array name in manifest: {e}", name) from None
    dtype = a.get("dtype")
    dt = DTYPES.get(dtype) if isinstance(dtype, str) else None
    if dt is None or a.get("stored_dtype") != dt.stored:
        raise _fail(run_id, step, f"bad dtype {dtype!r}/{a.get('stored_dtype')!r}", name)
    shape, cshape = a.get("shape"), a.get("chunk_shape")
    if not _int_list(shape) or not _int_list(cshape) or len(shape) != len(cshape):
        raise _fail(run_id, step, "bad shape or chunk_shape", name)
    if shape and (cshape[0] < 1 or cshape[1:] != [max(1, d) for d in shape[1:]]):
        raise _fail(run_id, step, f"unsupported chunk_shape {cshape} for shape {shape}", name)
    chunks = a.get("chunks")
    # Count before building anything: an absurd shape must cost nothing but this comparison.
    if not isinstance(chunks, list) or len(chunks) != _chunk_count(shape, cshape):
        raise _fail(run_id, step, "chunk list does not match shape", name)
    if math.prod(cshape) * dt.itemsize > MAX_CHUNK_BYTES:
        raise _fail(run_id, step, f"chunk_shape {cshape} makes chunks over {MAX_CHUNK_BYTES} bytes", name)
    specs = chunk_specs(tuple(shape), tuple(cshape), dt.itemsize)
    hashes = []
    for spec, c in zip(specs, chunks, strict=True):
        # Chunk keys come from our own computation, never from the file: no path escapes.
        if not isinstance(c, dict) or c.get("key") != spec.key or c.get("nbytes") != spec.nbytes:
            raise _fail(run_id, step, f"chunk entry {c!r} does not match the layout", name)
        h = c.get("xxh3_128")
        if not isinstance(h, str) or not _HEX128.match(h):
            raise _fail(run_id, step, f"bad hash for chunk {spec.key}", name)
        hashes.append(h)
    layout = ArrayLayout(name, dt, tuple(shape), tuple(cshape), specs)
    members: tuple[Member, ...] = ()
    if "packed" in a or is_pack_name(name):
        try:
            if version < 2:
                raise ValueError(f"packed tensors in a format_version {version} manifest")
            members = validate_members(layout, a.get("packed"))
        except ValueError as e:
            raise _fail(run_id, step, f"bad pack: {e}", name) from None
    return ArrayEntry(layout, hashes, members)


def decode_manifest(data: bytes, run_id: str, step: int) -> Manifest:
    """Parse and validate; raises CorruptCheckpointError on anything unexpected."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise _fail(run_id, step, f"manifest is not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise _fail(run_id, step, "manifest has no rebound format tag")
    version = doc.get("format_version")
    if version not in FORMAT_VERSIONS or isinstance(version, bool):
        raise _fail(run_id, step, f"unsupported format_version {version!r}")
    if doc.get("step") != step:
        raise _fail(run_id, step, f"manifest is for step {doc.get('step')!r}")
    if not isinstance(doc.get("metadata"), dict) or not isinstance(doc.get("arrays"), list):
        raise _fail(run_id, step, "manifest lacks metadata or arrays")
    arrays = [_decode_array(a, run_id, step, version) for a in doc["arrays"]]
    names = [a.layout.name for a in arrays]
    tensors = [m.name for a in arrays for m in a.members] + [n for n in names if not is_pack_name(n)]
    if len(set(names)) != len(names) or len(set(tensors)) != len(tensors):
        raise _fail(run_id, step, "duplicate array names in manifest")
    try:
        check_tree(names)
        check_tree(tensors)
    except ValueError as e:
        raise _fail(run_id, step, str(e)) from None
    documents = doc.get("documents")
    if not isinstance(documents, dict) or sorted(documents) != sorted(expected_documents(names)):
        raise _fail(run_id, step, "manifest document list does not match its arrays")
    if not all(isinstance(v, str) and _HEX128.match(v) for v in documents.values()):
        raise _fail(run_id, step, "manifest holds a bad document hash")
    if doc.get("run_id") != run_id:
        raise _fail(run_id, step, f"checkpoint belongs to run {doc.get('run_id')!r}, not this run")
    state_hash = doc.get("state_hash")
    if not isinstance(state_hash, str) or not _HEX128.match(state_hash):
        raise _fail(run_id, step, f"bad state_hash {state_hash!r}")
    created = doc.get("created_unix")
    if not isinstance(created, (int, float)) or isinstance(created, bool) or not math.isfinite(created):
        raise _fail(run_id, step, f"bad created_unix {created!r}")
    return Manifest(
        run_id=run_id,
        step=step,
        metadata=doc["metadata"],
        arrays=arrays,
        documents=dict(documents),
        state_hash=state_hash,
        created_unix=float(created),
    )


def encode_marker(run_id: str, step: int, manifest_hash: str) -> bytes:
    """The COMMITTED marker's bytes."""
    doc = {
        "format": FORMAT,
        "run_id": run_id,
        "step": step,
        "manifest_hash": manifest_hash,
        "committed_unix": time.time(),
    }
    return json.dumps(doc, indent=1).encode()


def decode_marker(data: bytes, run_id: str, step: int) -> str:
    """The manifest hash a marker commits to; CorruptCheckpointError if it is unreadable."""
    try:
        doc = json.loads(data)
        h = doc["manifest_hash"]
    except (ValueError, UnicodeDecodeError, TypeError, KeyError):
        raise _fail(run_id, step, "commit marker is unreadable") from None
    if not isinstance(h, str) or not _HEX128.match(h):
        raise _fail(run_id, step, "commit marker holds no valid manifest hash")
    if doc.get("run_id", run_id) != run_id:  # a checkpoint folder copied in from another run
        raise _fail(run_id, step, f"checkpoint belongs to run {doc.get('run_id')!r}, not this run")
    if doc.get("step", step) != step or isinstance(doc.get("step"), bool):
        raise _fail(run_id, step, f"commit marker is for step {doc.get('step')!r}")
    return h


def check_manifest_bytes(data: bytes, manifest_hash: str, run_id: str, step: int) -> Manifest:
    """Check manifest bytes against the marker's hash, then decode them."""
    actual = bytes_hash(data)
    if actual != manifest_hash:
        raise _fail(run_id, step, f"manifest hash {actual} != commit marker's {manifest_hash}")
    return decode_manifest(data, run_id, step)
