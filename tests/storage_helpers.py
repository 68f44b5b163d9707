"""Shared helpers for the storage tests: states to save, on-disk damage, subprocess writers.

Run as a script it is a writer process for the crash and race tests:
``python tests/storage_helpers.py save STORE RUN STEP SEED`` saves ``numpy_state(SEED)`` with
small chunks and prints the ref as JSON (numpy only, so the child starts without torch);
``... race STORE RUN ROUNDS SEED BARRIER_DIR N`` saves ``numpy_state(SEED)`` as steps
0..ROUNDS-1, meeting N-1 other writers before each commit (a barrier in BARRIER_DIR/<step>), and
prints one JSON line per step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
HELPERS = Path(__file__).resolve()
SMALL_CHUNK = 16 << 10  # small chunks: many files from little data


def numpy_state(seed: int, n_arrays: int = 6, rows: int = 64) -> dict[str, np.ndarray]:
    """A deterministic state of float32/int64 arrays, ~200 KiB, with several chunks per array."""
    rng = np.random.default_rng(seed)
    out: dict[str, np.ndarray] = {}
    for i in range(n_arrays):
        out[f"model/layer{i}.weight"] = rng.standard_normal((rows, 128), dtype=np.float32)
    out["optim/state/0/step"] = np.array(seed, dtype=np.int64)
    out["optim/state/0/exp_avg"] = rng.standard_normal((rows * 2,), dtype=np.float32)
    return out


def env_for_child(**extra: str) -> dict[str, str]:
    """Environment for a child Python that must import this checkout's packages."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(extra)
    return env


def start_writer(store: str, run: str, step: int, seed: int, **env: str) -> subprocess.Popen:
    """Start a writer subprocess (see the module doc)."""
    return subprocess.Popen(
        [sys.executable, str(HELPERS), "save", store, run, str(step), str(seed)],
        cwd=ROOT, env=env_for_child(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def run_storage_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python -m storage ARGS`` as a real subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "storage", *args],
        cwd=ROOT, env=env_for_child(), capture_output=True, text=True, timeout=timeout,
    )


def step_path(root: Path, run: str, step: int) -> Path:
    """Folder of a committed checkpoint on a local store."""
    return root / run / "ckpt" / f"{step:012d}"


def chunks_under(base: Path) -> list[Path]:
    """Every chunk file under a checkpoint or staging folder (``.../c/i/0`` or a 0-d ``.../c``)."""
    return sorted(
        p for p in base.rglob("*")
        if p.is_file() and (p.name == "c" or "c" in p.relative_to(base).parts[:-1])
    )


def chunk_files(root: Path, run: str, step: int) -> list[Path]:
    """Every chunk file of a committed local checkpoint."""
    return chunks_under(step_path(root, run, step))


def zarr_tensor(group: Any, name: str) -> tuple[np.ndarray, str]:
    """A tensor read with plain zarr-python, as the recipe in storage/packing.py and the README
    reads it: its own array, or its slice of a pack. Returns the bytes as zarr gives them
    (bfloat16 as its uint16 bits) and the true dtype name from the attributes."""
    if name in group:
        arr = group[name]
        return np.asarray(arr[...]), arr.attrs["dtype"]
    for pack in group["_packed"].array_values():
        members = {m["name"]: m for m in pack.attrs["packed"]}
        if name in members:
            m = members[name]
            n = math.prod(m["shape"])
            return np.asarray(pack[m["offset"] : m["offset"] + n]).reshape(m["shape"]), pack.attrs["dtype"]
    raise KeyError(name)


def flip_byte(path: Path, pos: int) -> None:
    """Flip every bit of the byte at ``pos`` (mod size) in place."""
    data = bytearray(path.read_bytes())
    i = pos % len(data)
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@contextlib.contextmanager
def small_tmpfs(folder: Path, size: str = "2m") -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted on ``folder`` (a disk that fills up); unmounted after.

    Skips the test where mounting is not allowed (not root, no mount namespace).
    """
    import pytest

    folder.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                         capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def assert_same_tensors(got: dict[str, Any], want: dict[str, Any]) -> None:
    """Bit-exact equality, same dtype and shape, torch or numpy on the expected side."""
    import torch

    assert sorted(got) == sorted(want)
    for name, w in want.items():
        g = got[name]
        w = w if isinstance(w, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(w)).reshape(np.shape(w))
        w = w.detach().cpu()
        assert isinstance(g, torch.Tensor), name
        assert g.dtype == w.dtype, (name, g.dtype, w.dtype)
        assert tuple(g.shape) == tuple(w.shape), (name, g.shape, w.shape)
        gb = g.cpu().clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8)
        wb = w.clone(memory_format=torch.contiguous_format).reshape(-1).view(torch.uint8)
        assert torch.equal(gb, wb), f"{name} differs"


def _main(argv: list[str]) -> int:
    if argv[0] == "save":
        sys.path.insert(0, str(ROOT))
        from storage import open_store

        store, run, step, seed = argv[1], argv[2], int(argv[3]), int(argv[4])
        s = open_store(store, chunk_bytes=SMALL_CHUNK)
        ref = s.save(run, step, numpy_state(seed), {"step": step, "seed": seed})
        stats = s.last_save_stats
        print(json.dumps({"ref": ref.to_dict(), "outcome": stats.outcome if stats else None}))
        return 0
    if argv[0] == "race":
        sys.path.insert(0, str(ROOT))
        from storage import open_store

        store, run, rounds, seed, barrier, n = argv[1], argv[2], int(argv[3]), int(argv[4]), argv[5], argv[6]
        s = open_store(store, chunk_bytes=SMALL_CHUNK)
        state = numpy_state(seed)
        for step in range(rounds):
            os.environ["REBOUND_STORAGE_FAULT"] = f"barrier:before-commit:{barrier}/{step}:{n}"
            print(json.dumps(race_save(s, run, step, state, {"seed": seed})), flush=True)
        return 0
    raise SystemExit(f"unknown role {argv[0]!r}")


def race_save(store: Any, run: str, step: int, state: dict, metadata: dict) -> dict:
    """One writer's save in a race (the barrier comes from REBOUND_STORAGE_FAULT): outcome, ref."""
    ref = store.save(run, step, state, {**metadata, "step": step})
    return {"step": step, "ref": ref.to_dict(), "outcome": store.last_save_stats.outcome}


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
