"""Saving one checkpoint: lay out, write chunks (hashing each block as it is written), write the
Zarr documents and the manifest, commit.

One tensor is in flight at a time, read straight from its memory, so the extra memory a save
needs is a few blocks (plus a contiguous copy of a tensor that is not contiguous). A retry of a
step whose earlier writer died reuses that writer's chunk files whose size and hash match the
bytes about to be written: they are hard-linked (local) or copied (fsspec), not rewritten.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import xxhash

from storage import faults
from storage.backend import Backend, ChunkSizeError, Staging
from storage.dtypes import lookup
from storage.hashing import StateHasher, bytes_hash
from storage.layout import ZARR_JSON, ArrayLayout, array_zarr_json, group_zarr_json, subgroups
from storage.manifest import MANIFEST, MARKER, ArrayEntry, Manifest, encode_manifest, encode_marker
from storage.names import check_tree, validate_tensor_name
from storage.packing import array_specs, encode_members, pack_buffer, plan_checkpoint, put_member

STAGING_PREFIX = ".staging-"


@dataclass
class SaveStats:
    """What the last save did.

    Attributes:
        bytes_written: chunk bytes written to new files.
        bytes_reused: chunk bytes not written because a file already held them: a dead
            writer's staging of the same step, or the previous checkpoint (unchanged chunks).
        chunks_written: chunk files written.
        chunks_reused: chunk files reused (linked or copied, each verified first).
        files_written: every file written (chunks, zarr.json, manifest, marker).
        seconds: wall time of the save.
        durability: how it was made durable ("syncfs", "fsync", "none", "object-store").
        outcome: "committed", "existing" (step already committed and verified) or "lost-race".
    """

    bytes_written: int = 0
    bytes_reused: int = 0
    chunks_written: int = 0
    chunks_reused: int = 0
    files_written: int = 0
    seconds: float = 0.0
    durability: str = ""
    outcome: str = ""


@dataclass
class StagedCheckpoint:
    """A fully written staging area, ready to commit."""

    staging: Staging
    manifest_hash: str
    marker: bytes


def previous_chunks(ckpt_dir: str, prev_step_name: str,
                    manifest: Manifest) -> dict[str, tuple[str, int, str]]:
    """Every chunk file of a committed checkpoint: relative path -> (path, nbytes, xxh3-128)."""
    base = f"{ckpt_dir}/{prev_step_name}"
    return {
        f"{entry.layout.name}/{spec.key}": (f"{base}/{entry.layout.name}/{spec.key}", spec.nbytes, digest)
        for entry in manifest.arrays
        for spec, digest in zip(entry.layout.chunks, entry.hashes, strict=True)
    }


def staging_prefix(step_name: str) -> str:
    """Name prefix of the staging folders for one step."""
    return f"{STAGING_PREFIX}{step_name}-"


def check_inputs(tensors: Mapping[str, Any], metadata: dict) -> bytes:
    """Validate names and metadata before anything touches the disk; returns metadata JSON."""
    if not isinstance(metadata, dict):
        raise TypeError(f"metadata must be a dict, got {type(metadata).__name__}")
    try:
        meta_json = json.dumps(metadata).encode()
    except (TypeError, ValueError) as e:
        raise ValueError(f"metadata must be JSON-serialisable: {e}") from None
    from storage.tensors import dtype_name

    names = list(tensors)
    for name in names:
        validate_tensor_name(name)
        lookup(dtype_name(tensors[name]))
    check_tree(names)
    return meta_json


class _Reuse:
    """Chunk files that may already hold a chunk's bytes, looked up by relative path: dead
    writers' files of the same step, and the previous committed checkpoint's (``previous``:
    relative path -> (path, nbytes, xxh3-128 its manifest records))."""

    def __init__(self, backend: Backend, dirs: list[str],
                 previous: Mapping[str, tuple[str, int, str]] | None = None) -> None:
        self._b = backend
        self._dirs = dirs
        self._previous = previous or {}

    def unchanged(self, relpath: str, nbytes: int) -> tuple[str, str] | None:
        """(path, digest) of the previous checkpoint's file at ``relpath`` if its size fits."""
        prev = self._previous.get(relpath)
        return (prev[0], prev[2]) if prev is not None and prev[1] == nbytes else None

    def candidates(self, relpath: str, nbytes: int) -> list[str]:
        if not self._dirs:
            return []
        return [f"{d}/{relpath}" for d in self._dirs if self._b.size(f"{d}/{relpath}") == nbytes]

    def matching(self, cands: list[str], nbytes: int, digest: str) -> str | None:
        for c in cands:
            h = xxhash.xxh3_128()
            try:
                self._b.read_chunk(c, nbytes, nbytes, None, [h])
            except (OSError, ChunkSizeError):
                continue
            if h.hexdigest() == digest:
                return c
        return None


class _Counter:
    """SaveStats updated from several I/O threads."""

    def __init__(self, stats: SaveStats) -> None:
        self.stats = stats
        self._lock = threading.Lock()

    def add(self, **fields: int) -> int:
        with self._lock:
            for k, v in fields.items():
                setattr(self.stats, k, getattr(self.stats, k) + v)
            return self.stats.chunks_written + self.stats.chunks_reused


def _put_chunk(
    staging: Staging, reuse: _Reuse, counter: _Counter, rel: str, data: memoryview, pad: int
) -> str:
    """Write (or reuse) one chunk file; returns the xxh3-128 of its stored bytes."""
    nbytes = len(data) + pad
    h = xxhash.xxh3_128()
    cands = reuse.candidates(rel, nbytes)
    prev = reuse.unchanged(rel, nbytes)
    if not cands and prev is None:
        written = staging.write_chunk(rel, data, pad, (h,), ())
    else:
        # Hash the new bytes from memory first, then compare with the files that may hold
        # them: the previous checkpoint's (an unchanged chunk: a frozen layer), a dead writer's.
        h.update(data)
        if pad:
            h.update(bytes(pad))
        digest = h.hexdigest()
        if prev is not None and prev[1] == digest:
            cands = [prev[0], *cands]
        # The file is read and hashed before it is linked: a manifest says what a file held
        # when it was committed, and a rotten one must not become part of this checkpoint too.
        src = reuse.matching(cands, nbytes, digest)
        if src is not None:
            staging.adopt(rel, src)
            counter.add(bytes_reused=nbytes, chunks_reused=1)
            return h.hexdigest()
        written = staging.write_chunk(rel, data, pad, (), ())
    done = counter.add(bytes_written=written, chunks_written=1, files_written=1)
    faults.after_chunks(done)
    return h.hexdigest()


def write_staging(
    backend: Backend,
    staging: Staging,
    run_id: str,
    step: int,
    ckpt_dir: str,
    step_name: str,
    tensors: Mapping[str, Any],
    metadata: dict,
    chunk_bytes: int,
    stats: SaveStats,
    io_threads: int = 4,
    previous: Mapping[str, tuple[str, int, str]] | None = None,
    pack_bytes: int = 0,
) -> StagedCheckpoint:
    """Write everything of one checkpoint into ``staging`` (not yet committed).

    Chunk files are written by ``io_threads`` threads: on the filesystems we measured, creating
    a file or folder costs ~1 ms of waiting, and threads overlap that wait with other chunks'
    data copies (os.write and xxhash both release the GIL). The main thread meanwhile feeds the
    state hash, which needs tensors in name order, from memory. Tensors under ``pack_bytes``
    are copied into one pack per dtype (storage.packing), written once all are in.

    A chunk whose bytes equal the same chunk of the previous checkpoint (``previous``, from
    ``previous_chunks``) is hard-linked (local) or copied server-side (fsspec), not written:
    readers and ``verify`` see an ordinary file, and deleting the older checkpoint leaves it.
    """
    from storage.tensors import host_bytes

    prefix = staging_prefix(step_name)
    mine = staging.path.rsplit("/", 1)[-1]
    others = [
        f"{ckpt_dir}/{n}" for n in backend.list_dir(ckpt_dir) if n.startswith(prefix) and n != mine
    ]
    reuse = _Reuse(backend, others, previous)
    counter = _Counter(stats)
    state = StateHasher()
    names = sorted(tensors)
    plan = plan_checkpoint(array_specs(tensors), chunk_bytes, pack_bytes)
    layouts = {lay.name: lay for lay in plan.layouts}
    packed = plan.packed()
    packs = {pack: pack_buffer(layouts[pack]) for pack in plan.members}
    pending: list[tuple[list[str], int, Future[str]]] = []
    documents: dict[str, Future[str]] = {}

    def put_doc(relpath: str, data: bytes) -> str:
        staging.write_file(relpath, data)
        counter.add(files_written=1)
        return bytes_hash(data)

    def put_array(layout: ArrayLayout, data: memoryview, doc: bytes) -> list[Future[str]]:
        hashes: list[str] = [""] * len(layout.chunks)
        futs = []
        for i, spec in enumerate(layout.chunks):
            fut = pool.submit(
                _put_chunk, staging, reuse, counter, f"{layout.name}/{spec.key}",
                data[spec.start : spec.start + spec.data_nbytes], spec.nbytes - spec.data_nbytes,
            )
            pending.append((hashes, i, fut))
            futs.append(fut)
        documents[f"{layout.name}/{ZARR_JSON}"] = pool.submit(put_doc, f"{layout.name}/{ZARR_JSON}", doc)
        entries.append(ArrayEntry(layout, hashes, plan.members.get(layout.name, ())))
        return futs

    entries: list[ArrayEntry] = []
    with ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="ckpt-write") as pool:
        try:
            for name in names:
                hb = host_bytes(tensors[name])
                if name in packed:
                    pack, member = packed[name]
                    put_member(packs[pack], member, layouts[pack].dtype.itemsize, hb.data)
                else:
                    layout = layouts[name]
                    mine_futs = put_array(layout, hb.data, array_zarr_json(layout))
                    if hb.copied:  # bound extra memory: one temporary copy in flight at a time
                        wait(mine_futs)
                state.begin(name, hb.dtype, hb.shape)
                state.update(hb.data)
                del hb
            for pack, buffer in packs.items():
                members = encode_members(plan.members[pack])
                put_array(layouts[pack], memoryview(buffer), array_zarr_json(layouts[pack], members))
            for group in subgroups(list(layouts)):
                documents[f"{group}/{ZARR_JSON}"] = pool.submit(put_doc, f"{group}/{ZARR_JSON}", group_zarr_json())
            root_attrs = {"rebound": {"run_id": run_id, "step": step}, "metadata": metadata}
            documents[ZARR_JSON] = pool.submit(put_doc, ZARR_JSON, group_zarr_json(root_attrs))
            for hashes, i, fut in pending:
                hashes[i] = fut.result()  # re-raises the first I/O error
            doc_hashes = {k: f.result() for k, f in documents.items()}
        except BaseException:
            for _, _, fut in pending:
                fut.cancel()
            raise

    faults.point("before-manifest")
    manifest = Manifest(
        run_id=run_id,
        step=step,
        metadata=metadata,
        arrays=entries,
        documents=doc_hashes,
        state_hash=state.hexdigest(),
        created_unix=time.time(),
    )
    manifest_bytes = encode_manifest(manifest)
    staging.write_file(MANIFEST, manifest_bytes)
    stats.files_written += 2  # the manifest, and the marker commit() writes
    staging.make_durable()
    manifest_hash = bytes_hash(manifest_bytes)
    return StagedCheckpoint(staging, manifest_hash, encode_marker(run_id, step, manifest_hash))


__all__ = [
    "MARKER", "SaveStats", "StagedCheckpoint", "check_inputs", "previous_chunks", "staging_prefix",
    "write_staging",
]
