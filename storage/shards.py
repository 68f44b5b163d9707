"""Sharded checkpoint writes: several ranks, one checkpoint (DESIGN.md §8 "Writes").

Data-parallel ranks hold the same full state. ``plan_shards`` splits a checkpoint's files among
them: the unit is one file, every chunk file and every array's ``zarr.json`` (arrays are too
coarse: a model's embedding and its two AdamW moments are three equal giants, and three
arrays over two ranks is a 2:1 split). Units go largest first to the least-loaded rank, weighed
by bytes plus a per-file cost, so the plan depends only on names, dtypes, shapes and the chunk
size: every rank computes the same plan without talking to the others.

Each rank writes its files into one staging area named from (step, session) and returns a
``ShareReceipt`` (plain JSON) once they are durable. One rank, holding every receipt, commits
(``CheckpointStore.commit_shares``): the receipts must cover the plan exactly, then the group
documents, the manifest and the marker are written and the area is published as ``save`` does.
The result is byte for byte the checkpoint one ``save`` of the same tensors writes (only the
manifest's and marker's timestamps differ): a reader cannot tell how many ranks wrote it.
"""

from __future__ import annotations

import heapq
import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass
from typing import Any

from storage.backend import Backend, Staging
from storage.hashing import bytes_hash
from storage.layout import ZARR_JSON, array_zarr_json
from storage.manifest import ArrayEntry
from storage.names import check_tree, validate_tensor_name
from storage.packing import (
    ArraySpec,
    CheckpointPlan,
    array_specs,
    build_pack,
    check_pack_bytes,
    encode_members,
    plan_checkpoint,
)
from storage.writer import STAGING_PREFIX, SaveStats, _Counter, _put_chunk, _Reuse

# What creating (and syncing) one more file costs, in bytes of writing: ~1 ms per file at
# ~1 GB/s (STACK-NOTES), so a share of many small files is not mistaken for a light one.
FILE_COST_BYTES = 1 << 20
RECEIPT_FORMAT = "rebound.share-receipt"
_SESSION_RE = re.compile(r"^[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,63}$")
_HEX128 = re.compile(r"^[0-9a-f]{32}$")



class ShareError(ValueError):
    """The receipts given to commit_shares do not make one checkpoint; nothing was committed."""


def validate_session(session: str) -> str:
    """A session names one attempt of a group's save: one path segment, at most 64 characters."""
    if not isinstance(session, str) or not _SESSION_RE.match(session):
        raise ValueError(
            f"session must be 1-64 letters, digits, '_', '-' or '.' (not first), got {session!r}"
        )
    return session


def share_area(step_name: str, session: str) -> str:
    """Folder name of the staging area every rank of ``session`` writes step ``step_name`` into.

    It starts like a single writer's staging folder, so retries reuse its chunks and cleanup
    removes it once no writer holds it.
    """
    return f"{STAGING_PREFIX}{step_name}-{validate_session(session)}"


def plan_from_specs(
    specs: Sequence[ArraySpec], world_size: int, chunk_bytes: int, pack_bytes: int = 0,
) -> list[list[str]]:
    """The files (paths relative to the checkpoint folder) each rank writes; see the module doc."""
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    units: list[tuple[int, str]] = []
    for lay in plan_checkpoint(specs, chunk_bytes, pack_bytes).layouts:
        units.append((FILE_COST_BYTES, f"{lay.name}/{ZARR_JSON}"))
        units += [(c.nbytes + FILE_COST_BYTES, f"{lay.name}/{c.key}") for c in lay.chunks]
    units.sort(key=lambda u: (-u[0], u[1]))
    loads = [(0, rank) for rank in range(world_size)]  # a heap: least-loaded, then lowest rank
    shares: list[list[str]] = [[] for _ in range(world_size)]
    for weight, path in units:
        load, rank = heapq.heappop(loads)
        shares[rank].append(path)
        heapq.heappush(loads, (load + weight, rank))
    return [sorted(s) for s in shares]


def plan_shards(
    tensors: Mapping[str, Any], world_size: int, chunk_bytes: int = 64 << 20, pack_bytes: int = 0,
) -> list[list[str]]:
    """Which files of the checkpoint each of ``world_size`` ranks writes, balanced by bytes.

    Deterministic: the same names, dtypes, shapes, ``chunk_bytes`` and ``pack_bytes`` give the
    same plan on every rank. Use ``CheckpointStore.plan_shards`` to get the store's own sizes.
    """
    return plan_from_specs(array_specs(tensors), world_size, chunk_bytes, pack_bytes)


@dataclass(frozen=True)
class ShareReceipt:
    """What one rank's share holds, as the committer needs it (plain JSON on the wire).

    Attributes:
        run_id, step, session: the checkpoint and the attempt the share belongs to.
        rank, world_size: whose share, out of how many.
        chunk_bytes: the chunk size the plan and layouts were made with.
        arrays: (name, dtype, shape) of every tensor of the checkpoint, sorted: the committer
            rebuilds the plan and every layout (chunking, packs) from it.
        files: (path in the checkpoint, xxh3-128 of its bytes) of every file of this share.
        state_hash: the state_hash of the whole state as this rank holds it.
        bytes_written, bytes_reused, chunks_written, chunks_reused, files_written: the share's
            I/O (reused = taken from an earlier attempt's staging after its hash matched).
        seconds: wall time of the share's write.
        written_unix: when the share became durable; the manifest's ``created_unix`` is the
            latest of these, so two committers of one session write the same manifest bytes.
    """

    run_id: str
    step: int
    session: str
    rank: int
    world_size: int
    chunk_bytes: int
    arrays: tuple[ArraySpec, ...]
    files: tuple[tuple[str, str], ...]
    state_hash: str
    bytes_written: int = 0
    bytes_reused: int = 0
    chunks_written: int = 0
    chunks_reused: int = 0
    files_written: int = 0
    seconds: float = 0.0
    written_unix: float = 0.0
    pack_bytes: int = 0

    def to_json(self) -> str:
        """One JSON object (no pickle): send it to the committing rank however ranks talk."""
        doc = asdict(self)
        doc["arrays"] = [[n, d, list(s)] for n, d, s in self.arrays]
        doc["files"] = [list(f) for f in self.files]
        return json.dumps({"format": RECEIPT_FORMAT, **doc}, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> ShareReceipt:
        """Parse a receipt; ValueError naming what is wrong with it."""
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"share receipt is not JSON: {e}") from None
        if not isinstance(doc, dict) or doc.pop("format", None) != RECEIPT_FORMAT:
            raise ValueError("not a share receipt (format tag missing)")
        try:
            arrays = tuple((str(n), str(d), tuple(_nat(x) for x in s)) for n, d, s in doc.pop("arrays"))
            files = tuple((str(p), str(h)) for p, h in doc.pop("files"))
            receipt = cls(arrays=arrays, files=files, **doc)
            for name in ("step", "rank", "world_size", "chunk_bytes", "bytes_written", "bytes_reused",
                         "chunks_written", "chunks_reused", "files_written", "pack_bytes"):
                _nat(getattr(receipt, name))
            if not all(isinstance(getattr(receipt, k), str) for k in ("run_id", "session", "state_hash")):
                raise ValueError("run_id, session and state_hash must be strings")
            for name in ("seconds", "written_unix"):
                v = getattr(receipt, name)
                if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                    raise ValueError(f"{name} must be a finite number, got {v!r}")
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"malformed share receipt: {e}") from None
        return receipt


def _nat(x: object) -> int:
    if not isinstance(x, int) or isinstance(x, bool) or x < 0:
        raise ValueError(f"expected an int >= 0, got {x!r}")
    return x


def write_share_files(
    backend: Backend,
    staging: Staging,
    area: str,
    others: list[str],
    tensors: Mapping[str, Any],
    plan: CheckpointPlan,
    mine: set[str],
    stats: SaveStats,
    io_threads: int,
    known_state_hash: str | None,
    previous: Mapping[str, tuple[str, int, str]] | None = None,
) -> tuple[dict[str, str], str]:
    """Write this rank's files into ``staging``; returns {path: xxh3} and the state_hash.

    A file already in the area (an earlier attempt of this session) or in another staging of
    the step (a dead writer's) is kept when its size and hash match, as ``save`` reuses chunks,
    and a chunk unchanged since the previous checkpoint (``previous``) is linked from there.
    Tensors whose files are all elsewhere are not read at all when ``known_state_hash`` is given.
    """
    from storage.hashing import state_hash
    from storage.tensors import HostBytes, host_bytes

    reuse = _Reuse(backend, [area, *others], previous)
    counter = _Counter(stats)
    futures: dict[str, Future[str]] = {}

    def put_doc(rel: str, data: bytes) -> str:
        staging.write_file(rel, data)
        counter.add(files_written=1)
        return bytes_hash(data)

    with ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="share-write") as pool:
        try:
            for lay in plan.layouts:
                members = plan.members.get(lay.name, ())
                doc = f"{lay.name}/{ZARR_JSON}"
                if doc in mine:
                    futures[doc] = pool.submit(put_doc, doc, array_zarr_json(lay, encode_members(members)))
                my_chunks = [c for c in lay.chunks if f"{lay.name}/{c.key}" in mine]
                if not my_chunks:
                    continue
                if members:
                    pack = build_pack(lay, members, tensors)
                    hb = HostBytes(lay.dtype.name, lay.shape, memoryview(pack), pack, True)
                else:
                    hb = host_bytes(tensors[lay.name])
                batch = []
                for c in my_chunks:
                    rel = f"{lay.name}/{c.key}"
                    data = hb.data[c.start : c.start + c.data_nbytes]
                    futures[rel] = pool.submit(
                        _put_chunk, staging, reuse, counter, rel, data, c.nbytes - c.data_nbytes
                    )
                    batch.append(futures[rel])
                if hb.copied:  # bound extra memory: one temporary copy in flight at a time
                    wait(batch)
                del hb
            hashes = {rel: f.result() for rel, f in futures.items()}  # re-raises the first error
        except BaseException:
            for f in futures.values():
                f.cancel()
            raise
    # A second pass over the tensors only when the caller has no state_hash yet: it needs every
    # tensor in name order, packed ones among them.
    return hashes, known_state_hash if known_state_hash is not None else state_hash(tensors)


@dataclass
class Assembled:
    """The receipts of every rank, checked and merged into the manifest's array entries."""

    entries: list[ArrayEntry]
    array_docs: dict[str, str]  # zarr.json path -> xxh3
    state_hash: str
    files: dict[str, int]  # every file the shares wrote -> its size
    created_unix: float


def assemble(receipts: Sequence[ShareReceipt], run_id: str, step: int, session: str) -> Assembled:
    """Check that ``receipts`` are exactly one share per rank of the same plan; merge them.

    Raises:
        ShareError: a share missing or given twice, receipts of another checkpoint or session,
            ranks that disagree (plan or state_hash), a share that is not its plan's files.
    """
    where = f"{run_id}@{step} (session {session!r})"
    if not receipts:
        raise ShareError(f"no share receipts for {where}: nothing committed")
    for r in receipts:
        if not isinstance(r, ShareReceipt):
            raise TypeError(f"expected ShareReceipt, got {type(r).__name__}")
        if (r.run_id, r.step, r.session) != (run_id, step, session):
            raise ShareError(
                f"rank {r.rank}'s receipt is for {r.run_id}@{r.step} (session {r.session!r}), "
                f"not {where}: nothing committed"
            )
    first = receipts[0]
    world = first.world_size
    for r in receipts[1:]:
        if (r.world_size, r.chunk_bytes, r.pack_bytes, r.arrays) != (
            world, first.chunk_bytes, first.pack_bytes, first.arrays
        ):
            raise ShareError(
                f"ranks {first.rank} and {r.rank} planned different checkpoints (world size, chunk "
                f"size or arrays differ) for {where}: nothing committed"
            )
        if r.state_hash != first.state_hash:
            raise ShareError(
                f"ranks disagree on state_hash for {where} (rank {first.rank}: {first.state_hash}, "
                f"rank {r.rank}: {r.state_hash}): their states differ, nothing committed"
            )
    if not _HEX128.match(first.state_hash):
        raise ShareError(f"bad state_hash {first.state_hash!r} in the receipts for {where}")
    counts = Counter(r.rank for r in receipts)
    outside = sorted(k for k in counts if not 0 <= k < world)
    twice = sorted(k for k, n in counts.items() if n > 1)
    missing = sorted(set(range(world)) - set(counts))
    if outside:
        raise ShareError(f"receipts of rank(s) {outside} outside world size {world} for {where}: nothing committed")
    if twice:
        raise ShareError(f"share of rank(s) {twice} given twice for {where}: nothing committed")
    if missing:
        raise ShareError(
            f"missing share(s) of rank(s) {missing} of {world} for {where}: nothing committed"
        )

    specs = list(first.arrays)
    try:
        names = [validate_tensor_name(n) for n, _, _ in specs]
        check_tree(names)
        if names != sorted(set(names)):
            raise ValueError("array names are not sorted and unique")
        layout_plan = plan_checkpoint(specs, first.chunk_bytes, check_pack_bytes(first.pack_bytes))
    except (ValueError, TypeError) as e:
        raise ShareError(f"receipts for {where} list bad arrays: {e}") from None
    plan = plan_from_specs(specs, world, first.chunk_bytes, first.pack_bytes)
    hashes: dict[str, str] = {}
    for r in receipts:
        got = dict(r.files)
        want = set(plan[r.rank])
        if len(got) != len(r.files) or set(got) != want:
            odd = sorted(set(got) ^ want)[:3]
            raise ShareError(
                f"rank {r.rank}'s share does not match the plan for {where} (e.g. {odd}): "
                "nothing committed"
            )
        hashes.update(got)
    bad = [p for p, h in hashes.items() if not _HEX128.match(h)]
    if bad:
        raise ShareError(f"bad hash for {bad[0]} in the receipts for {where}: nothing committed")

    entries, docs, sizes = [], {}, {}
    for lay in layout_plan.layouts:
        members = layout_plan.members.get(lay.name, ())
        doc = f"{lay.name}/{ZARR_JSON}"
        body = array_zarr_json(lay, encode_members(members))
        if hashes[doc] != bytes_hash(body):  # it is fully determined by the layout: check it
            raise ShareError(f"{doc} in the receipts for {where} is not its layout's document")
        docs[doc], sizes[doc] = hashes[doc], len(body)
        entries.append(ArrayEntry(lay, [hashes[f"{lay.name}/{c.key}"] for c in lay.chunks], members))
        sizes.update({f"{lay.name}/{c.key}": c.nbytes for c in lay.chunks})
    return Assembled(entries, docs, first.state_hash, sizes, max(r.written_unix for r in receipts))


__all__ = [
    "FILE_COST_BYTES", "Assembled", "ShareError", "ShareReceipt", "array_specs", "assemble",
    "plan_from_specs", "plan_shards", "share_area", "validate_session", "write_share_files",
]
