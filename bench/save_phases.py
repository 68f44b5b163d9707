"""Where the store's save spends its time: one real `CheckpointStore.save`, split into phases.

    python -m bench.save_phases --size 512MiB        # a GPT-shaped fp32 state dict
    python -m bench.save_phases --preset small       # the small preset's model + AdamW state

The save is the store's own, unchanged; the bench wraps, for that one call, the staging area's
methods (to time the phases on the calling thread and the I/O threads' work) and the os calls
that create files and make them durable (to count them). Phases, on the calling thread:
  prepare_s       input checks, the existing-commit check, the staging folder
  chunks_s        tensor -> bytes, every chunk created + written + hashed (I/O threads), the
                  state hash (calling thread), the Zarr documents; ends when all are written
  manifest_s      the manifest written
  durable_s       make_durable: one syncfs (waits for the whole filesystem's dirty pages, other
                  processes' included) or an fsync per file
  commit_s        the marker, its folder's fsync, the rename, the parent's fsync
  other_s         the rest of the call (total_s minus the phases above)
Inside chunks_s, summed over the I/O threads (they overlap, so this can exceed chunks_s):
  chunk_thread_s  seconds in write_chunk (create + write + hash of each chunk)
  doc_thread_s    seconds writing Zarr documents
Counts (os calls made during the save, every thread): files_created (open with O_CREAT),
dirs_created (mkdir), fsyncs, syncfs, writeback_starts (sync_file_range after each file in
syncfs mode), renames, links, write_calls; and chunks, tensors, arrays (small tensors are packed
into one array per dtype), bytes.
Reference costs of the same bytes, measured alone on one thread right after the save:
  alone_to_bytes_s        storage.tensors.host_bytes of every tensor (first touch, copies)
  alone_chunk_hash_s      xxh3-128 of every chunk's bytes
  alone_state_hash_s      the state hash (a second pass over the same bytes)
  alone_page_cache_write_s  the bytes written to one file, no fsync (a memcpy into the cache)
  alone_fsync_s           then that file's fsync (the device's writeback of those bytes)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import xxhash

from bench._table import print_table

PHASES = ("prepare_s", "chunks_s", "manifest_s", "durable_s", "commit_s", "other_s")
COUNTS = ("files_created", "dirs_created", "fsyncs", "syncfs", "writeback_starts", "renames", "links",
          "write_calls")


class _OsCounter:
    """Counts os calls of a save from every thread, by wrapping them for its duration."""

    def __init__(self) -> None:
        self.counts = dict.fromkeys(COUNTS, 0)
        self._lock = threading.Lock()

    def _bump(self, key: str) -> None:
        with self._lock:
            self.counts[key] += 1

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        import storage.localfs as localfs

        real = {n: getattr(os, n) for n in ("open", "mkdir", "fsync", "rename", "replace", "link", "write")}
        real_syncfs, real_writeback = localfs._syncfs, getattr(localfs, "_start_writeback", None)

        def counted(name: str, key: str, when=lambda *a, **k: True):  # noqa: ANN202
            def call(*args: Any, **kwargs: Any) -> Any:
                out = real[name](*args, **kwargs)  # counted only when it succeeded
                if when(*args, **kwargs):
                    self._bump(key)
                return out
            return call

        def syncfs(fd: int) -> bool:
            done = real_syncfs(fd)
            if done:
                self._bump("syncfs")
            return done

        def writeback(fd: int) -> None:
            assert real_writeback is not None
            real_writeback(fd)
            self._bump("writeback_starts")

        creating = lambda path, flags, *a, **k: bool(flags & os.O_CREAT)  # noqa: E731
        wrappers = {"open": counted("open", "files_created", creating), "mkdir": counted("mkdir", "dirs_created"),
                    "fsync": counted("fsync", "fsyncs"), "rename": counted("rename", "renames"),
                    "replace": counted("replace", "renames"), "link": counted("link", "links"),
                    "write": counted("write", "write_calls")}
        try:
            for n, w in wrappers.items():
                setattr(os, n, w)
            localfs._syncfs = syncfs
            if real_writeback is not None:
                localfs._start_writeback = writeback
            yield
        finally:
            for n, f in real.items():
                setattr(os, n, f)
            localfs._syncfs = real_syncfs
            if real_writeback is not None:
                localfs._start_writeback = real_writeback


class _Timeline:
    """Wraps one staging area's methods: phase boundaries on the calling thread, thread-seconds."""

    def __init__(self) -> None:
        self.marks: dict[str, float] = {}
        self.chunk_thread_s = self.doc_thread_s = 0.0
        self._lock = threading.Lock()
        self._in_doc = threading.local()  # write_file calls write_chunk: count it once

    def _add(self, attr: str, seconds: float) -> None:
        with self._lock:
            setattr(self, attr, getattr(self, attr) + seconds)

    def wrap_backend(self, backend: Any) -> None:
        begin = backend.begin_staging

        def begin_staging(*args: Any, **kwargs: Any) -> Any:
            staging = begin(*args, **kwargs)
            self.marks["staging_ready"] = time.perf_counter()
            self._wrap_staging(staging)
            return staging

        backend.begin_staging = begin_staging  # this backend object only, for this one save

    def _wrap_staging(self, staging: Any) -> None:
        from storage.manifest import MANIFEST

        write_chunk, write_file = staging.write_chunk, staging.write_file
        make_durable, commit = staging.make_durable, staging.commit

        def timed_chunk(*args: Any, **kwargs: Any) -> Any:
            if getattr(self._in_doc, "on", False):
                return write_chunk(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return write_chunk(*args, **kwargs)
            finally:
                self._add("chunk_thread_s", time.perf_counter() - t0)

        def timed_file(relpath: str, data: bytes) -> None:
            t0 = time.perf_counter()
            if relpath == MANIFEST:
                self.marks["manifest_start"] = t0
            self._in_doc.on = True
            try:
                write_file(relpath, data)
            finally:
                self._in_doc.on = False
            if relpath == MANIFEST:
                self.marks["manifest_end"] = time.perf_counter()
            else:
                self._add("doc_thread_s", time.perf_counter() - t0)

        def timed(name: str, fn: Any) -> Any:
            def call(*args: Any, **kwargs: Any) -> Any:
                self.marks[f"{name}_start"] = time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.marks[f"{name}_end"] = time.perf_counter()
            return call

        staging.write_chunk, staging.write_file = timed_chunk, timed_file
        staging.make_durable, staging.commit = timed("durable", make_durable), timed("commit", commit)


def _alone(state: Mapping[str, torch.Tensor], chunk_bytes: int, scratch: str) -> dict[str, float]:
    """Single-thread costs of the same bytes, each on its own (see the module doc)."""
    from storage.hashing import StateHasher
    from storage.tensors import host_bytes

    out: dict[str, float] = {}
    t0 = time.perf_counter()
    views = {name: host_bytes(state[name]) for name in sorted(state)}
    out["alone_to_bytes_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for hb in views.values():
        for start in range(0, len(hb.data), chunk_bytes):
            xxhash.xxh3_128(hb.data[start:start + chunk_bytes]).hexdigest()
    out["alone_chunk_hash_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    h = StateHasher()
    for name, hb in views.items():
        h.begin(name, hb.dtype, hb.shape)
        h.update(hb.data)
    h.hexdigest()
    out["alone_state_hash_s"] = time.perf_counter() - t0
    path = os.path.join(scratch, "alone.bin")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        t0 = time.perf_counter()
        for hb in views.values():
            off = 0
            while off < len(hb.data):
                off += os.write(fd, hb.data[off:])
        out["alone_page_cache_write_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        os.fsync(fd)
        out["alone_fsync_s"] = time.perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(path)
    return out


def profile_save(store: Any, run_id: str, step: int, state: Mapping[str, torch.Tensor],
                 scratch: str) -> dict[str, Any]:
    """One real save of `state` by `store`, timed by phase and counted; plus reference costs.

    `store` is a CheckpointStore on a local folder; `scratch` a folder on the same filesystem.
    """
    timeline, counter = _Timeline(), _OsCounter()
    backend = store.backend
    timeline.wrap_backend(backend)
    try:
        with counter.installed():
            t0 = time.perf_counter()
            store.save(run_id, step, state, {"step": step})
            t_end = time.perf_counter()
    finally:
        vars(backend).pop("begin_staging", None)  # back to the class's own method
    m = timeline.marks
    phases = {
        "prepare_s": m["staging_ready"] - t0,
        "chunks_s": m["manifest_start"] - m["staging_ready"],
        "manifest_s": m["manifest_end"] - m["manifest_start"],
        "durable_s": m["durable_end"] - m["durable_start"],
        "commit_s": m["commit_end"] - m["commit_start"],
    }
    total = t_end - t0
    phases["other_s"] = total - sum(phases.values())
    stats = store.last_save_stats
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    out: dict[str, Any] = {
        "total_s": total, **phases,
        "chunk_thread_s": timeline.chunk_thread_s, "doc_thread_s": timeline.doc_thread_s,
        **counter.counts,
        "chunks": stats.chunks_written + stats.chunks_reused, "tensors": len(state),
        "arrays": len(store.read_manifest(run_id, step)[0].arrays),  # small tensors are packed
        "bytes": nbytes, "durability": stats.durability,
    }
    out.update(_alone(state, store.config.chunk_bytes, scratch))
    return out


def phase_rows(p: dict[str, Any]) -> list[dict[str, Any]]:
    """The phases as table rows: seconds and share of the save's total."""
    rows = [{"phase": k.removesuffix("_s"), "seconds": round(p[k], 4),
             "share": f"{100 * p[k] / p['total_s']:.1f}%"} for k in PHASES]
    rows.append({"phase": "total", "seconds": round(p["total_s"], 4), "share": "100%"})
    for k in ("chunk_thread_s", "doc_thread_s", *(k for k in p if k.startswith("alone_"))):
        rows.append({"phase": f"({k.removesuffix('_s')})", "seconds": round(p[k], 4), "share": ""})
    return rows


def counts_line(p: dict[str, Any]) -> str:
    return (f"{p['bytes'] / 2**20:.1f} MiB in {p['tensors']} tensors, {p['arrays']} arrays, {p['chunks']} chunks, "
            "durability "
            f"{p['durability']}: " + ", ".join(f"{k} {p[k]}" for k in COUNTS))


def preset_state(model: str) -> dict[str, torch.Tensor]:
    """The full training state (model + AdamW moments) of a preset, after one step."""
    from training.config import TrainConfig
    from training.data import load_corpus
    from training.loop import Trainer

    trainer = Trainer(TrainConfig(model=model, steps=2, device="cpu").resolved(), load_corpus(None), device="cpu")
    trainer.train_step()  # AdamW's moments exist only after a step
    tensors, _ = trainer.capture()
    return {k: v.clone() for k, v in tensors.items()}


def main(argv: list[str] | None = None) -> int:
    from bench.checkpoint import gpt_state, parse_size
    from storage import open_store

    p = argparse.ArgumentParser(prog="python -m bench.save_phases", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group()
    what.add_argument("--size", type=parse_size, help="GPT-shaped fp32 state of this size (default 512MiB)")
    what.add_argument("--preset", help="a model preset's training state instead (e.g. small)")
    p.add_argument("--dir", default=None, help="scratch folder (default: the temp dir); removed afterwards")
    p.add_argument("--chunk-mib", type=int, default=64, help="store chunk size in MiB (default 64)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args(argv)
    state = preset_state(args.preset) if args.preset else gpt_state(args.size or parse_size("512MiB"))
    work = tempfile.mkdtemp(prefix="bench-phases-", dir=args.dir)
    try:
        store = open_store(os.path.join(work, "store"), chunk_bytes=args.chunk_mib << 20)
        phases = profile_save(store, "bench", 1, state, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        print(json.dumps(phases))
    else:
        print_table("store save, by phase (one save)", phase_rows(phases), {})
        print(counts_line(phases))
    return 0


if __name__ == "__main__":
    sys.exit(main())
