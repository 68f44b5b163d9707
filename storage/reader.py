"""Reading one checkpoint: trust chain marker -> manifest -> chunk hashes.

Loading reads each chunk straight into the memory of the tensor it belongs to and hashes the
bytes as they arrive, so verification costs no second pass. Every failure becomes a
CorruptCheckpointError naming run, step, array and chunk; filesystem errors other than a
missing file become TransientStoreError (or FatalStoreError: permission denied, ...).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import xxhash

from storage.backend import Backend, ChunkSizeError
from storage.errors import CheckpointNotFoundError, CorruptCheckpointError, classify_os_error
from storage.manifest import (
    MANIFEST,
    MARKER,
    ArrayEntry,
    Manifest,
    check_manifest_bytes,
    decode_marker,
)
from storage.refs import CheckpointRef


@dataclass
class VerifyReport:
    """Result of checking every chunk of one checkpoint.

    Attributes:
        ref: the checkpoint (None when even its marker/manifest could not be read).
        ok: True when everything verified.
        problems: one error per bad chunk/document (or one for the manifest/marker).
        state_hash: recomputed from the stored bytes; None unless ok.
        chunks_checked: chunk files read and hashed.
        bytes_checked: bytes read.
    """

    run_id: str
    step: int
    ref: CheckpointRef | None = None
    ok: bool = False
    problems: list[CorruptCheckpointError] = field(default_factory=list)
    state_hash: str | None = None
    chunks_checked: int = 0
    bytes_checked: int = 0

    def to_dict(self) -> dict:
        """JSON-able form (CLI --json)."""
        return {
            "run_id": self.run_id,
            "step": self.step,
            "ok": self.ok,
            "manifest_hash": self.ref.manifest_hash if self.ref else None,
            "state_hash": self.state_hash,
            "chunks_checked": self.chunks_checked,
            "bytes_checked": self.bytes_checked,
            "problems": [p.to_dict() for p in self.problems],
        }


def read_small(backend: Backend, path: str) -> bytes | None:
    """A small file's bytes; None when it is absent (other errors are classified and raised)."""
    try:
        return backend.read_bytes(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise classify_os_error(e, backend.url, f"reading {path}") from e


def open_manifest(backend: Backend, run_id: str, step: int, step_dir: str) -> tuple[Manifest, CheckpointRef]:
    """Read the marker and the manifest it commits to; CheckpointNotFoundError if no step."""
    marker = read_small(backend, f"{step_dir}/{MARKER}")
    if marker is None:
        if not backend.exists(step_dir):
            raise CheckpointNotFoundError(f"run {run_id!r} has no checkpoint at step {step}")
        raise CorruptCheckpointError(run_id, step, "commit marker missing (not committed or damaged)")
    manifest_hash = decode_marker(marker, run_id, step)
    data = read_small(backend, f"{step_dir}/{MANIFEST}")
    if data is None:
        raise CorruptCheckpointError(run_id, step, "manifest.json missing")
    manifest = check_manifest_bytes(data, manifest_hash, run_id, step)
    return manifest, CheckpointRef(run_id, step, manifest_hash)


def read_chunk(
    backend: Backend, run_id: str, step: int, step_dir: str, entry: ArrayEntry, i: int,
    dest: memoryview | None, verify: bool, data_hashers: list,
) -> None:
    """Read chunk ``i`` of ``entry`` (into ``dest`` if given) and check its hash."""
    spec = entry.layout.chunks[i]
    name = entry.layout.name
    h = xxhash.xxh3_128()
    try:
        backend.read_chunk(
            f"{step_dir}/{name}/{spec.key}", spec.nbytes, spec.data_nbytes, dest,
            [h] if verify else [], data_hashers,
        )
    except FileNotFoundError:
        raise CorruptCheckpointError(run_id, step, "chunk file missing", array=name, chunk=spec.key) from None
    except ChunkSizeError as e:
        what = "truncated" if e.actual < e.expected else "too long"
        raise CorruptCheckpointError(
            run_id, step, f"chunk file {what}: {e}", array=name, chunk=spec.key
        ) from None
    except OSError as e:
        raise classify_os_error(e, backend.url, f"reading {name}/{spec.key} of {run_id}@{step}") from e
    if verify and h.hexdigest() != entry.hashes[i]:
        raise CorruptCheckpointError(
            run_id, step, f"hash mismatch: stored bytes hash to {h.hexdigest()}, manifest says {entry.hashes[i]}",
            array=name, chunk=spec.key,
        )


def load_tensors(
    backend: Backend, manifest: Manifest, step_dir: str, device: str, verify: bool,
    io_threads: int = 4,
) -> dict[str, Any]:
    """Every tensor of the checkpoint as torch tensors on ``device``.

    Chunks are read by ``io_threads`` threads, each straight into its slice of the final
    tensor (reads and xxhash release the GIL, so the disk queue stays full while hashing).
    """
    import torch

    from storage.tensors import empty_tensor

    pin = str(device).startswith("cuda") and torch.cuda.is_available()
    run_id, step = manifest.run_id, manifest.step
    host: dict[str, Any] = {}
    packs: list[tuple[ArrayEntry, Any]] = []
    jobs = []
    for entry in manifest.arrays:
        lay = entry.layout
        t, view = empty_tensor(lay.dtype.name, lay.shape, pin=pin)
        if entry.members:
            packs.append((entry, t))
        else:
            host[lay.name] = t
        for i, spec in enumerate(lay.chunks):
            jobs.append((entry, i, view[spec.start : spec.start + spec.data_nbytes]))
    with ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="ckpt-read") as pool:
        futs = [
            pool.submit(read_chunk, backend, run_id, step, step_dir, e, i, dest, verify, [])
            for e, i, dest in jobs
        ]
        try:
            for f in futs:
                f.result()  # the first failure in chunk order is the one reported
        except BaseException:
            for f in futs:
                f.cancel()
            raise
    for entry, pack in packs:
        # Each tensor gets memory of its own: a view into the pack would keep the whole pack
        # alive and be saved whole by torch.save.
        for m in entry.members:
            host[m.name] = pack[m.offset : m.offset + m.numel].reshape(m.shape).clone()
    if str(device) == "cpu":
        return host
    out = {k: t.to(device, non_blocking=pin) for k, t in host.items()}
    if pin:
        torch.cuda.synchronize()
    return out
