"""Checkpoint write/read throughput: the store against the disk's sequential limit, a raw
writer, torch.save and safetensors, side by side in one invocation.

    python -m bench.checkpoint --size 1GiB [--rounds 3] [--json] [--phases] [--dir /tmp] [--chunk-mib 64]

Rows (``method``), all on the same GPT-shaped fp32 state dict, each fsynced and each file
dropped from the page cache afterwards (posix_fadvise DONTNEED), store files included, so every
read is cold the same way:
  disk_seq_write       the device's sequential limit: the same bytes as one file written in
                       order, one fsync at the end (what `dd conv=fsync` does).
  disk_seq_read        a cold sequential read of that file into one buffer.
  raw_write            one file per tensor, each written from the tensor's memory and fsynced
                       in turn: what a plain single-threaded writer gets.
  raw_read             read those files back, one after another, into fresh buffers.
  torch_save           torch.save to a temporary file + fsync + rename (the usual recipe).
  torch_load           torch.load(weights_only=True) of that file.
  safetensors_save     safetensors.torch.save_file + fsync.
  safetensors_load     safetensors.torch.load_file.
  store_save           CheckpointStore.save (chunks + hashes + manifest + atomic commit).
  store_save_fsync     the same with per-file fsync instead of one syncfs.
  store_load_verified  CheckpointStore.load with verification of every chunk hash.
Each round runs the write/read pairs in turn, in the reverse order every other round. Numbers
per row, medians over --rounds with their min and max beside them in the table (NAME_min and
NAME_max in --json): gbps (state bytes / seconds), seconds; then vs_disk_seq and vs_raw (gbps over
disk_seq_write's or raw_write's for writes, over the *_read row's for reads) and extra_peak_mib
(resident memory high-water above the level before the call, sampled every 2 ms; writes only).
Ratios in --json (throughput ratios of medians, higher is better for the store):
  store_save_vs_disk_seq_write, store_save_vs_safetensors_save, store_save_vs_torch_save,
  store_save_vs_raw_write, store_load_verified_vs_disk_seq_read, store_load_verified_vs_raw_read.
--json also carries "phases": one more store save timed by phase and counted (files created,
fsyncs...), as `python -m bench.save_phases` prints it; --phases prints that table too.

With --store s3://bucket/prefix (endpoint and keys from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY or FSSPEC_S3_*), the store on that object store against plain s3fs
instead, the same bytes under the same prefix, order alternating every round:
  s3fs_put             every tensor's bytes as one object, all put concurrently by s3fs
                       (fs.pipe of a dict): no hashes, no manifest, no commit.
  s3fs_get             those objects read back concurrently (fs.cat).
  store_save           CheckpointStore.save on S3 (intent, chunks straight to their final keys
                       with hashes, manifest, conditional marker).
  store_load_verified  CheckpointStore.load with every chunk hash verified.
Ratios: store_save_vs_s3fs_put, store_load_verified_vs_s3fs_get (throughput, higher is better
for the store).

With --async, background saves against synchronous ones instead (bench/async_save.py): the
store's save against AsyncSaver's stall on the --size state, then --train-steps of real
training with no saves, a background save every --save-every steps, and a synchronous one.
Ratios: async_stall_vs_sync_save, train_async_vs_no_save, train_sync_vs_no_save.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable

import torch

from bench._table import print_table, with_spread
from bench.save_phases import counts_line, phase_rows, profile_save

_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "kb": 10**3, "mb": 10**6, "gb": 10**9}


def parse_size(text: str) -> int:
    """'1GiB' -> 1073741824."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; use e.g. 256MiB or 1GiB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def gpt_state(nbytes: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A GPT-2-shaped fp32 state dict of about ``nbytes``: embeddings, per-layer attention and
    MLP weights, and the many small layernorm/bias tensors a real model has."""
    params = nbytes // 4
    d = 1024 if params > 150e6 else 512 if params > 20e6 else 128
    vocab, ctx = 50304 if params > 20e6 else 4096, 1024 if params > 20e6 else 256
    per_layer = 12 * d * d + 13 * d
    layers = max(1, round((params - (vocab + ctx + 2) * d) / per_layer))
    g = torch.Generator().manual_seed(seed)
    shapes: dict[str, tuple[int, ...]] = {"transformer.wte.weight": (vocab, d), "transformer.wpe.weight": (ctx, d)}
    for i in range(layers):
        p = f"transformer.h.{i}."
        shapes |= {
            p + "ln_1.weight": (d,), p + "ln_1.bias": (d,),
            p + "attn.c_attn.weight": (3 * d, d), p + "attn.c_attn.bias": (3 * d,),
            p + "attn.c_proj.weight": (d, d), p + "attn.c_proj.bias": (d,),
            p + "ln_2.weight": (d,), p + "ln_2.bias": (d,),
            p + "mlp.c_fc.weight": (4 * d, d), p + "mlp.c_fc.bias": (4 * d,),
            p + "mlp.c_proj.weight": (d, 4 * d), p + "mlp.c_proj.bias": (d,),
        }
    shapes |= {"transformer.ln_f.weight": (d,), "transformer.ln_f.bias": (d,)}
    return {f"model/{k}": torch.randn(s, generator=g) for k, s in shapes.items()}


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(fn: Callable[[], object], track_memory: bool) -> tuple[float, int]:
    """Seconds taken and the resident-memory high-water above the start (bytes)."""
    base = peak = _rss()
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _rss())
            time.sleep(0.002)

    th = threading.Thread(target=sample, daemon=True)
    if track_memory:
        th.start()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    if track_memory:
        stop.set()
        th.join()
        peak = max(peak, _rss())
    return dt, peak - base


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def drop_cache(path: str) -> None:
    """Evict a file or a folder's files from the page cache, so the next read hits the disk."""
    paths = [path] if os.path.isfile(path) else [os.path.join(r, f) for r, _, fs in os.walk(path) for f in fs]
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_write(state: dict[str, torch.Tensor], folder: str) -> None:
    os.makedirs(folder)
    for i, t in enumerate(state.values()):
        mv = memoryview(t.reshape(-1).view(torch.uint8).numpy())
        fd = os.open(os.path.join(folder, str(i)), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            off = 0
            while off < len(mv):
                off += os.write(fd, mv[off:])
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_path(folder)


def raw_read(state: dict[str, torch.Tensor], folder: str) -> list[torch.Tensor]:
    out = []
    for i, t in enumerate(state.values()):
        buf = torch.empty(t.shape, dtype=t.dtype)
        mv = memoryview(buf.reshape(-1).view(torch.uint8).numpy())
        with open(os.path.join(folder, str(i)), "rb", buffering=0) as f:
            off = 0
            while off < len(mv):
                off += f.readinto(mv[off:])
        out.append(buf)
    return out


def torch_save(state: dict[str, torch.Tensor], path: str) -> None:
    tmp = path + ".tmp"
    torch.save(state, tmp)
    _fsync_path(tmp)
    os.rename(tmp, path)
    _fsync_path(os.path.dirname(path))


def safetensors_save(state: dict[str, torch.Tensor], path: str) -> None:
    from safetensors.torch import save_file

    save_file(state, path)
    _fsync_path(path)


def disk_seq_write(state: dict[str, torch.Tensor], path: str) -> None:
    """All the state's bytes as one file, in order, then one fsync (dd conv=fsync)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        for t in state.values():
            mv = memoryview(t.reshape(-1).view(torch.uint8).numpy())
            off = 0
            while off < len(mv):
                off += os.write(fd, mv[off:])
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_seq_read(path: str, nbytes: int) -> torch.Tensor:
    """The whole file, read in order into one fresh buffer."""
    buf = torch.empty(nbytes, dtype=torch.uint8)
    mv = memoryview(buf.numpy())
    with open(path, "rb", buffering=0) as f:
        off = 0
        while off < nbytes:
            n = f.readinto(mv[off:])
            if not n:
                raise OSError(f"{path}: short read at {off} of {nbytes} bytes")
            off += n
    return buf


Step = tuple[str, Callable[[], object], bool, Callable[[], None]]


def _round_steps(state: dict[str, torch.Tensor], work: str, store, store_fsync, r: int) -> list[Step]:
    """(name, call, is_write, clean-up) of one round, in the order they run.

    Write/read pairs stay together (a read needs its write); the pairs' order is reversed every
    other round, so no contender always runs first, or right after the same neighbour.
    """
    from safetensors.torch import load_file

    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    raw_dir, pt, st, seq = (os.path.join(work, n) for n in ("raw", "state.pt", "state.safetensors", "seq.bin"))
    pairs: list[list[Step]] = [[
        ("disk_seq_write", lambda: disk_seq_write(state, seq), True, lambda: drop_cache(seq)),
        ("disk_seq_read", lambda: disk_seq_read(seq, nbytes), False, lambda: os.unlink(seq)),
    ], [
        ("raw_write", lambda: raw_write(state, raw_dir), True, lambda: drop_cache(raw_dir)),
        ("raw_read", lambda: raw_read(state, raw_dir), False, lambda: shutil.rmtree(raw_dir)),
    ], [
        ("torch_save", lambda: torch_save(state, pt), True, lambda: drop_cache(pt)),
        ("torch_load", lambda: torch.load(pt, weights_only=True), False, lambda: os.unlink(pt)),
    ], [
        ("safetensors_save", lambda: safetensors_save(state, st), True, lambda: drop_cache(st)),
        ("safetensors_load", lambda: load_file(st), False, lambda: os.unlink(st)),
    ], [
        ("store_save", lambda: store.save("bench", r, state, {"step": r}), True,
         lambda: drop_cache(os.path.join(work, "store"))),
        ("store_load_verified", lambda: store.load("bench", r, verify=True), False,
         lambda: store.delete_run("bench")),
    ], [
        ("store_save_fsync", lambda: store_fsync.save("bench", r, state, {"step": r}), True,
         lambda: store_fsync.delete_run("bench")),
    ]]
    if r % 2:
        pairs.reverse()
    return [step for pair in pairs for step in pair]


WRITES = ("disk_seq_write", "raw_write", "torch_save", "safetensors_save", "store_save", "store_save_fsync")
RATIOS = {  # name: (reference row, store row); throughput of the store over the reference's
    "store_save_vs_disk_seq_write": ("disk_seq_write", "store_save"),
    "store_save_vs_safetensors_save": ("safetensors_save", "store_save"),
    "store_save_vs_torch_save": ("torch_save", "store_save"),
    "store_save_vs_raw_write": ("raw_write", "store_save"),
    "store_load_verified_vs_disk_seq_read": ("disk_seq_read", "store_load_verified"),
    "store_load_verified_vs_raw_read": ("raw_read", "store_load_verified"),
}


def run(size: int, rounds: int, base_dir: str, chunk_mib: int, phases: bool = True) -> dict:
    """Every contender --rounds times; rows, ratios (DESIGN.md section 7) and the save's phases."""
    from storage import open_store

    state = gpt_state(size)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    work = tempfile.mkdtemp(prefix="bench-ckpt-", dir=base_dir)
    results: dict[str, list[tuple[float, int]]] = {}
    order: list[list[str]] = []
    phase_doc = None
    try:
        store = open_store(os.path.join(work, "store"), chunk_bytes=chunk_mib << 20)
        store_fsync = open_store(os.path.join(work, "store_fsync"), chunk_bytes=chunk_mib << 20, durability="fsync")
        for r in range(rounds):
            steps = _round_steps(state, work, store, store_fsync, r)
            order.append([name for name, *_ in steps])
            for name, fn, is_write, after in steps:
                results.setdefault(name, []).append(timed(fn, is_write))
                after()
            print(f"round {r + 1}/{rounds} done", file=sys.stderr)
        if phases:
            phase_doc = profile_save(store, "bench-phases", 0, state, work)
            store.delete_run("bench-phases")
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    med = {k: statistics.median(s for s, _ in v) for k, v in results.items()}
    for name, samples in results.items():
        is_write = name in WRITES
        seconds = [s for s, _ in samples]
        row: dict = {"method": name}
        with_spread(row, "gbps", [nbytes / s / 1e9 for s in seconds])
        with_spread(row, "seconds", seconds, 4)
        seq, raw = ("disk_seq_write", "raw_write") if is_write else ("disk_seq_read", "raw_read")
        row["vs_disk_seq"] = round(med[seq] / med[name], 3)
        row["vs_raw"] = round(med[raw] / med[name], 3)
        row["extra_peak_mib"] = round(max(m for _, m in samples) / 2**20, 1) if is_write else None
        rows.append(row)
    ratios = {k: round(med[ref] / med[mine], 3) for k, (ref, mine) in RATIOS.items()}
    return {
        "size_bytes": nbytes,
        "tensors": len(state),
        "rounds": rounds,
        "chunk_mib": chunk_mib,
        "rows": rows,
        "ratios": ratios,
        "seconds": {k: [s for s, _ in v] for k, v in results.items()},
        "order": order,
        "phases": phase_doc,
    }


S3_RATIOS = {"store_save_vs_s3fs_put": ("s3fs_put", "store_save"),
             "store_load_verified_vs_s3fs_get": ("s3fs_get", "store_load_verified")}


def run_s3(size: int, rounds: int, url: str, chunk_mib: int) -> dict:
    """The store on an S3 URL against plain s3fs puts and gets of the same bytes (see --help)."""
    import uuid

    from storage import open_store

    state = gpt_state(size)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    prefix = f"{url.rstrip('/')}/bench-{uuid.uuid4().hex[:8]}"
    store = open_store(f"{prefix}/store", chunk_bytes=chunk_mib << 20)
    fs, raw_root = store.backend.fs, f"{store.backend.root.rsplit('/', 1)[0]}/s3fs"
    keys = {name: f"{raw_root}/{name}" for name in state}

    def put() -> None:
        fs.pipe({keys[n]: t.numpy().tobytes() for n, t in state.items()})

    def get() -> object:
        return fs.cat(list(keys.values()))

    results: dict[str, list[tuple[float, int]]] = {}
    order: list[list[str]] = []
    try:
        for r in range(rounds):
            pairs = [[("s3fs_put", put), ("s3fs_get", get)],
                     [("store_save", lambda r=r: store.save("bench", r, state, {"step": r})),
                      ("store_load_verified", lambda r=r: store.load("bench", r, verify=True))]]
            if r % 2:
                pairs.reverse()
            order.append([name for pair in pairs for name, _ in pair])
            for pair in pairs:
                for name, fn in pair:
                    results.setdefault(name, []).append(timed(fn, name.endswith(("put", "save"))))
            fs.rm(raw_root, recursive=True)
            store.delete_run("bench")
            print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    finally:
        try:
            fs.rm(store.backend.root.rsplit("/", 1)[0], recursive=True)
        except FileNotFoundError:
            pass
    med = {k: statistics.median(s for s, _ in v) for k, v in results.items()}
    rows = []
    for name, samples in results.items():
        seconds = [s for s, _ in samples]
        row: dict = {"method": name}
        with_spread(row, "gbps", [nbytes / s / 1e9 for s in seconds])
        with_spread(row, "seconds", seconds, 4)
        base = "s3fs_put" if name.endswith(("put", "save")) else "s3fs_get"
        row["vs_s3fs"] = round(med[base] / med[name], 3)
        rows.append(row)
    return {"size_bytes": nbytes, "tensors": len(state), "rounds": rounds, "chunk_mib": chunk_mib,
            "store": url, "rows": rows,
            "ratios": {k: round(med[a] / med[b], 3) for k, (a, b) in S3_RATIOS.items()},
            "seconds": {k: [s for s, _ in v] for k, v in results.items()}, "order": order}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.checkpoint",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--size", type=parse_size, default=parse_size("1GiB"), help="state dict size (default 1GiB)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported (default 3)")
    p.add_argument("--dir", default=None, help="scratch folder (default: the temp dir); removed afterwards")
    p.add_argument("--chunk-mib", type=int, default=64, help="store chunk size in MiB (default 64)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--phases", action="store_true",
                   help="also print where the store's save spends its time (always in --json)")
    p.add_argument("--store", default=None, metavar="URL",
                   help="an s3:// URL: the store there against plain s3fs puts (see above)")
    p.add_argument("--async", dest="async_", action="store_true",
                   help="background saves instead: see `python -m bench.async_save` below")
    p.add_argument("--model", default="small", help="with --async: the training preset (default small)")
    p.add_argument("--train-steps", type=int, default=60, help="with --async: steps timed (default 60)")
    p.add_argument("--save-every", type=int, default=20, help="with --async: steps between saves (default 20)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    if args.async_:
        from bench.async_save import run_async

        out = run_async(gpt_state(args.size), args.rounds, args.dir or tempfile.gettempdir(),
                        args.chunk_mib, args.model, args.train_steps, args.save_every)
        if args.json:
            print(json.dumps(out))
        else:
            print_table(f"{out['size_bytes'] / 2**30:.2f} GiB state for the store part; "
                        f"{out['model']} preset, {out['train_steps']} steps, a save every "
                        f"{out['save_every']}, {out['torch_threads']} torch threads; median "
                        f"(min-max) of {out['rounds']} rounds", out["rows"], out["ratios"])
        return 0
    if args.store is not None:
        if not args.store.startswith("s3://"):
            p.error("--store takes an s3:// URL")
        out = run_s3(args.size, args.rounds, args.store, args.chunk_mib)
        if args.json:
            print(json.dumps(out))
        else:
            print_table(f"{out['size_bytes'] / 2**30:.2f} GiB, {out['tensors']} fp32 tensors on "
                        f"{args.store}, median (min-max) of {out['rounds']} rounds, store chunks "
                        f"{out['chunk_mib']} MiB", out["rows"], out["ratios"])
        return 0
    out = run(args.size, args.rounds, args.dir or tempfile.gettempdir(), args.chunk_mib,
              phases=args.json or args.phases)
    if args.json:
        print(json.dumps(out))
    else:
        title = (f"{out['size_bytes'] / 2**30:.2f} GiB, {out['tensors']} fp32 tensors, "
                 f"median (min-max) of {out['rounds']} rounds, store chunks {out['chunk_mib']} MiB")
        print_table(title, out["rows"], out["ratios"])
        if out["phases"] is not None:
            print_table("store_save by phase (one more save)", phase_rows(out["phases"]), {})
            print(counts_line(out["phases"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
