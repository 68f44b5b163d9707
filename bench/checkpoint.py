"""Checkpoint write/read throughput: the store against a raw write, torch.save and safetensors.

    python -m bench.checkpoint --size 1GiB [--rounds 3] [--json] [--dir /tmp] [--chunk-mib 64]

Rows (``method``), all on the same GPT-shaped fp32 state dict, each fsynced and each file
dropped from the page cache afterwards (posix_fadvise DONTNEED) so every read is cold:
  raw_write            one file per tensor, each written from the tensor's memory and fsynced
                       in turn: what a plain single-threaded writer gets (the reference).
  raw_read             read those files back, one after another, into fresh buffers.
  torch_save           torch.save to a temporary file + fsync + rename (the usual recipe).
  torch_load           torch.load(weights_only=True) of that file.
  safetensors_save     safetensors.torch.save_file + fsync.
  safetensors_load     safetensors.torch.load_file.
  store_save           CheckpointStore.save (chunks + hashes + manifest + atomic commit).
  store_save_fsync     the same with per-file fsync instead of one syncfs.
  store_load_verified  CheckpointStore.load with verification of every chunk hash.
Numbers per row: gbps (state bytes / seconds, median of rounds), seconds (median), vs_raw
(gbps over raw_write's for writes, over raw_read's for reads) and extra_peak_mib (resident
memory high-water above the level before the call, sampled every 2 ms; writes only).
Ratios in --json (throughput ratios, higher is better):
  store_save_vs_raw_write, store_save_vs_torch_save, store_save_vs_safetensors_save,
  store_load_verified_vs_raw_read.
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

from bench._table import print_table

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


def _round_steps(state: dict[str, torch.Tensor], work: str, store, store_fsync, r: int) -> list:
    """(name, call, is_write, clean-up) of one round, in the order they run."""
    from safetensors.torch import load_file

    raw_dir, pt, st = (os.path.join(work, n) for n in ("raw", "state.pt", "state.safetensors"))
    steps: list[tuple[str, Callable[[], object], bool, Callable[[], None]]] = [
        ("raw_write", lambda: raw_write(state, raw_dir), True, lambda: drop_cache(raw_dir)),
        ("raw_read", lambda: raw_read(state, raw_dir), False, lambda: shutil.rmtree(raw_dir)),
        ("torch_save", lambda: torch_save(state, pt), True, lambda: drop_cache(pt)),
        ("torch_load", lambda: torch.load(pt, weights_only=True), False, lambda: os.unlink(pt)),
        ("safetensors_save", lambda: safetensors_save(state, st), True, lambda: drop_cache(st)),
        ("safetensors_load", lambda: load_file(st), False, lambda: os.unlink(st)),
        ("store_save", lambda: store.save("bench", r, state, {"step": r}), True,
         lambda: drop_cache(os.path.join(work, "store"))),
        ("store_load_verified", lambda: store.load("bench", r, verify=True), False,
         lambda: store.delete_run("bench")),
        ("store_save_fsync", lambda: store_fsync.save("bench", r, state, {"step": r}), True,
         lambda: store_fsync.delete_run("bench")),
    ]
    return steps


def run(size: int, rounds: int, base_dir: str, chunk_mib: int) -> dict:
    from storage import open_store

    state = gpt_state(size)
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    work = tempfile.mkdtemp(prefix="bench-ckpt-", dir=base_dir)
    results: dict[str, list[tuple[float, int]]] = {}
    try:
        store = open_store(os.path.join(work, "store"), chunk_bytes=chunk_mib << 20)
        store_fsync = open_store(os.path.join(work, "store_fsync"), chunk_bytes=chunk_mib << 20, durability="fsync")
        for r in range(rounds):
            steps = _round_steps(state, work, store, store_fsync, r)
            for name, fn, is_write, after in steps:
                results.setdefault(name, []).append(timed(fn, is_write))
                after()
            print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = []
    med = {k: statistics.median(s for s, _ in v) for k, v in results.items()}
    for name, samples in results.items():
        is_write = "save" in name or name == "raw_write"
        ref = med["raw_write"] if is_write else med["raw_read"]
        rows.append(
            {
                "method": name,
                "gbps": round(nbytes / med[name] / 1e9, 3),
                "seconds": round(med[name], 4),
                "vs_raw": round(ref / med[name], 3),
                "extra_peak_mib": round(max(m for _, m in samples) / 2**20, 1) if is_write else None,
            }
        )
    ratios = {
        "store_save_vs_raw_write": med["raw_write"] / med["store_save"],
        "store_save_vs_torch_save": med["torch_save"] / med["store_save"],
        "store_save_vs_safetensors_save": med["safetensors_save"] / med["store_save"],
        "store_load_verified_vs_raw_read": med["raw_read"] / med["store_load_verified"],
    }
    return {
        "size_bytes": nbytes,
        "tensors": len(state),
        "rounds": rounds,
        "chunk_mib": chunk_mib,
        "rows": rows,
        "ratios": {k: round(v, 3) for k, v in ratios.items()},
    }


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
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    out = run(args.size, args.rounds, args.dir or tempfile.gettempdir(), args.chunk_mib)
    if args.json:
        print(json.dumps(out))
    else:
        title = (f"{out['size_bytes'] / 2**30:.2f} GiB, {out['tensors']} fp32 tensors, "
                 f"median of {out['rounds']}, store chunks {out['chunk_mib']} MiB")
        print_table(title, out["rows"], out["ratios"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
