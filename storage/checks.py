"""Every check of a committed checkpoint short of hashing its chunk bytes.

One code path for every reader: ``verify``/``latest_verified_ref`` (then hash every chunk),
``load``/``load_latest_verified`` (then read and hash every chunk into the tensors) and
``latest_committed_ref`` (stops here). Checked, in order:

1. the commit marker and the manifest it names agree (hash), the manifest's schema is sound
   (field types, dtypes, shapes, chunk counts; ``storage.manifest``), and marker, manifest and
   the root ``zarr.json`` all name this run and step (a folder copied in from another run fails);
2. every ``zarr.json`` the manifest lists is present with its hash;
3. every chunk file is present with exactly the manifest's size (before anything is allocated);
4. no file in the checkpoint folder is missing from the manifest (zarr clients would read it).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from storage.backend import Backend
from storage.errors import CorruptCheckpointError, classify_os_error
from storage.hashing import StateHasher, bytes_hash
from storage.layout import ZARR_JSON
from storage.manifest import MANIFEST, MARKER, ArrayEntry, Manifest
from storage.packing import Member, pack_buffer
from storage.reader import VerifyReport, open_manifest, read_chunk, read_small
from storage.refs import CheckpointRef


@dataclass
class Structure:
    """A checkpoint whose marker and manifest could be read, and what is wrong with it."""

    manifest: Manifest
    ref: CheckpointRef
    problems: list[CorruptCheckpointError]
    bad_chunks: set[tuple[str, str]]
    """(array, chunk key) of chunk files already reported missing or of the wrong size."""


def check_structure(backend: Backend, run_id: str, step: int, step_dir: str, io_threads: int = 4) -> Structure:
    """Checks 1-4 of the module doc; problems are collected.

    Raises:
        CheckpointNotFoundError: no checkpoint at that step.
        CorruptCheckpointError: the marker or manifest is unusable (nothing else can be checked).
        TransientStoreError/FatalStoreError: the filesystem failed.
    """
    try:
        return _check(backend, run_id, step, step_dir, io_threads)
    except OSError as e:
        raise classify_os_error(e, backend.url, f"checking {run_id}@{step}") from e


def _check(backend: Backend, run_id: str, step: int, step_dir: str, io_threads: int) -> Structure:
    manifest, ref = open_manifest(backend, run_id, step, step_dir)
    problems: list[CorruptCheckpointError] = []
    for path, digest in sorted(manifest.documents.items()):
        data = read_small(backend, f"{step_dir}/{path}")
        node = path.rsplit("/", 1)[0] if "/" in path else None
        if data is None or bytes_hash(data) != digest:
            why = "missing" if data is None else "hash mismatch"
            problems.append(CorruptCheckpointError(run_id, step, f"zarr.json {why}", array=node, chunk=ZARR_JSON))
        elif path == ZARR_JSON:
            owner = _root_owner(data)
            if owner != (run_id, step):
                problems.append(CorruptCheckpointError(
                    run_id, step, f"zarr.json names checkpoint {owner!r}, not this run and step",
                    chunk=ZARR_JSON,
                ))
    jobs = [(e.layout.name, spec) for e in manifest.arrays for spec in e.layout.chunks]
    with ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="ckpt-stat") as pool:
        sizes = list(pool.map(lambda job: backend.size(f"{step_dir}/{job[0]}/{job[1].key}"), jobs))
    bad: set[tuple[str, str]] = set()
    for (name, spec), size in zip(jobs, sizes, strict=True):
        if size == spec.nbytes:
            continue
        if size is None:
            why = "chunk file missing"
        else:
            what = "truncated" if size < spec.nbytes else "too long"
            why = f"chunk file {what}: chunk file has {size} bytes, expected {spec.nbytes}"
        problems.append(CorruptCheckpointError(run_id, step, why, array=name, chunk=spec.key))
        bad.add((name, spec.key))
    listed = {MANIFEST, MARKER, *manifest.documents}
    listed.update(f"{name}/{spec.key}" for name, spec in jobs)
    arrays = sorted((e.layout.name for e in manifest.arrays), key=len, reverse=True)
    for rel in backend.list_files(step_dir):
        if rel in listed:
            continue
        owner = next((a for a in arrays if rel.startswith(f"{a}/")), None)
        problems.append(CorruptCheckpointError(
            run_id, step, f"file not listed in the manifest: {rel}",
            array=owner, chunk=rel[len(owner) + 1:] if owner else None,
        ))
    return Structure(manifest, ref, problems, bad)


def _root_owner(data: bytes) -> tuple[object, object] | None:
    try:
        tag = json.loads(data)["attributes"]["rebound"]
        return tag["run_id"], tag["step"]
    except (ValueError, UnicodeDecodeError, TypeError, KeyError):
        return None


def scan(backend: Backend, run_id: str, step: int, step_dir: str, io_threads: int = 4) -> VerifyReport:
    """Every check of ``check_structure``, then every chunk read and hashed (recomputing
    state_hash on the way); never raises for corruption (problems are collected), only
    TransientStoreError/FatalStoreError for I/O trouble."""
    report = VerifyReport(run_id, step)
    try:
        st = check_structure(backend, run_id, step, step_dir, io_threads)
    except CorruptCheckpointError as e:
        report.problems.append(e)
        return report
    report.ref = st.ref

    def check(entry: ArrayEntry, dest: np.ndarray | None, hashers: list) -> None:
        for i, spec in enumerate(entry.layout.chunks):
            if (entry.layout.name, spec.key) in st.bad_chunks:
                continue  # already reported: missing or the wrong size
            view = None if dest is None else memoryview(dest)[spec.start : spec.start + spec.data_nbytes]
            try:
                read_chunk(backend, run_id, step, step_dir, entry, i, view, True, hashers)
            except CorruptCheckpointError as e:
                report.problems.append(e)
            report.chunks_checked += 1
            report.bytes_checked += spec.nbytes

    # Packs are read first, whole (they hold only small tensors): the state hash takes every
    # tensor in name order, and packed ones sit between the others.
    packed: dict[str, tuple[ArrayEntry, np.ndarray, Member]] = {}
    for entry in st.manifest.arrays:
        if entry.members:
            buffer = pack_buffer(entry.layout)
            check(entry, buffer, [])
            packed.update((m.name, (entry, buffer, m)) for m in entry.members)
    arrays = st.manifest.by_name()
    state = StateHasher()
    for name, dtype, shape in st.manifest.tensors():
        state.begin(name, dtype, shape)
        if name in packed:
            entry, buffer, m = packed[name]
            size = entry.layout.dtype.itemsize
            state.update(memoryview(buffer)[m.offset * size : (m.offset + m.numel) * size])
        else:
            check(arrays[name], None, [state])
    report.problems += st.problems
    report.ok = not report.problems
    if report.ok:
        report.state_hash = state.hexdigest()
    return report
