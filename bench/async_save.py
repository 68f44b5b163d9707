"""What a checkpoint costs training, synchronous against background (`--async-save`) saves.

    python -m bench.checkpoint --async [--size 512MiB] [--rounds 3] [--train-steps 60]
                               [--save-every 20] [--model small] [--json]

Part 1, the store alone, on the same GPT-shaped fp32 state as bench.checkpoint:
  sync_save        CheckpointStore.save: training would stand still for all of it.
  async_stall      AsyncSaver.submit with no save in flight: the snapshot into the reused host
                   buffers, all that training waits for.
  async_total      submit to commit (the snapshot plus the background save).
Part 2, real training (training.loop.Trainer, --model preset, one process, the machine's torch
threads), the same --train-steps timed from the first step to the last commit:
  train_no_save    no checkpoints at all.
  train_async      a background save every --save-every steps (the last one waited for).
  train_sync       a synchronous save at the same steps.
Contenders alternate their order every round; numbers are medians with min and max (--json:
NAME_min, NAME_max). Ratios: async_stall_vs_sync_save (lower is better; aim <= 0.1),
train_async_vs_no_save and train_sync_vs_no_save (throughput over no saves; aim >= 0.98).
Each store's run is deleted after every save, so no save reuses another's chunks.
"""

from __future__ import annotations

import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

from bench._table import with_spread


def _store_part(state: dict, work: str, rounds: int, chunk_mib: int) -> dict[str, list[float]]:
    from storage import open_store
    from storage.async_save import AsyncSaver

    store = open_store(os.path.join(work, "store"), chunk_bytes=chunk_mib << 20)
    saver: AsyncSaver = AsyncSaver()
    out: dict[str, list[float]] = {"sync_save": [], "async_stall": [], "async_total": []}

    def sync() -> None:
        t0 = time.perf_counter()
        store.save("sync", 1, state, {})
        out["sync_save"].append(time.perf_counter() - t0)
        store.delete_run("sync")

    def background() -> None:
        t0 = time.perf_counter()
        out["async_stall"].append(saver.submit("async@1", state,
                                               lambda snap: store.save("async", 1, snap, {})))
        saver.wait()
        out["async_total"].append(time.perf_counter() - t0)
        store.delete_run("async")

    saver.prepare(state)  # a worker's saver is long-lived: its buffers are touched once
    try:
        for r in range(rounds):
            for fn in ((sync, background) if r % 2 == 0 else (background, sync)):
                fn()
    finally:
        saver.close()
    return out


def _train(model: str, steps: int, every: int | None, mode: str, work: str) -> float:
    """Seconds from the first step to the last commit (a fresh trainer, same seed each time)."""
    from storage import open_store
    from storage.async_save import AsyncSaver
    from training.config import TrainConfig
    from training.data import load_corpus
    from training.loop import Trainer

    trainer = Trainer(TrainConfig(model=model, steps=steps + 1).resolved(), load_corpus(None))
    trainer.train_step()  # AdamW's first step loads torch._dynamo: outside the window
    store = open_store(os.path.join(work, f"train-{mode}"))
    saver: AsyncSaver = AsyncSaver()
    saver.prepare(trainer.capture()[0])  # as a worker does once, before its first group
    try:
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
            if every is None or trainer.step % every:
                continue
            tensors, meta = trainer.capture()
            if mode == "async":
                saver.submit(f"train@{trainer.step}", tensors,
                             lambda snap, s=trainer.step, m=meta: store.save("t", s, snap, m))
            else:
                store.save("t", trainer.step, tensors, meta)
        saver.wait()
        return time.perf_counter() - t0
    finally:
        saver.close()
        store.delete_run("t")


def run_async(state: dict, rounds: int, base_dir: str, chunk_mib: int, model: str,
              train_steps: int, save_every: int) -> dict:
    """Both parts; rows and ratios in bench.checkpoint's --json shape."""
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    work = tempfile.mkdtemp(prefix="bench-async-", dir=base_dir)
    seconds: dict[str, list[float]] = {}
    try:
        for name, values in _store_part(state, work, rounds, chunk_mib).items():
            seconds[name] = values
        print("store part done", file=sys.stderr)
        contenders: list[tuple[str, Callable[[], float]]] = [
            ("train_no_save", lambda: _train(model, train_steps, None, "none", work)),
            ("train_async", lambda: _train(model, train_steps, save_every, "async", work)),
            ("train_sync", lambda: _train(model, train_steps, save_every, "sync", work)),
        ]
        for r in range(rounds):
            for name, fn in (contenders if r % 2 == 0 else contenders[::-1]):
                seconds.setdefault(name, []).append(fn())
            print(f"training round {r + 1}/{rounds} done", file=sys.stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in seconds.items()}
    rows = []
    for name, values in seconds.items():
        row: dict = {"method": name}
        with_spread(row, "seconds", values, 4)
        training = name.startswith("train_")
        with_spread(row, "gbps", [None if training else nbytes / s / 1e9 for s in values])
        with_spread(row, "steps_per_s", [train_steps / s if training else None for s in values])
        rows.append(row)
    ratios = {
        "async_stall_vs_sync_save": round(med["async_stall"] / med["sync_save"], 4),
        "train_async_vs_no_save": round(med["train_no_save"] / med["train_async"], 4),
        "train_sync_vs_no_save": round(med["train_no_save"] / med["train_sync"], 4),
    }
    return {"size_bytes": nbytes, "tensors": len(state), "rounds": rounds, "chunk_mib": chunk_mib,
            "model": model, "train_steps": train_steps, "save_every": save_every,
            "torch_threads": _threads(), "rows": rows, "ratios": ratios, "seconds": seconds}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


__all__ = ["run_async"]
