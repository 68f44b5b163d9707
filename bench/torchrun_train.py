"""Contender (b) of bench.recovery: the training script a PyTorch user would run under torchrun.

    torchrun --standalone --nproc-per-node=1 --max-restarts=3 bench/torchrun_train.py \\
        --model small --steps 60 --ckpt-every 10 --threads 2 --out DIR

The same Trainer (model, data, seed, schedule) as Rebound, with the usual safe checkpointing:
every N steps `torch.save` to a temporary file, fsync, rename. On (re)start it resumes from that
checkpoint when there is one; that is all the recovery torchrun gives: when the process dies the
elastic agent starts a new one, which pays `import torch` and the optimizer's first use again.

It writes, under --out:
  ckpt.pt          the checkpoint (tensors of Trainer.capture() and its metadata as JSON text,
                   so it loads with torch.load(weights_only=True): no pickle code runs)
  steps.log        one line per completed optimizer step: "step unix_time pid step_seconds",
                   flushed at once (the benchmark tails it to find when to kill and when training
                   is back; step_seconds is StepResult.seconds, checkpointing excluded)
  starts.log       one line per process start: "pid start_unix ready_unix resumed_from_step"
                   (start: before `import torch`; ready: model built and checkpoint loaded;
                   resumed_from_step -1 when there was no checkpoint)
  final.json       at the end: final step, train loss, and the state_hash of model+optimizer
                   (DESIGN.md §2, the value Rebound's summary reports for the same state)
"""

from __future__ import annotations

import time

T_PROCESS = time.time()  # before `import torch`: the restart cost includes the import

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

from training.config import TrainConfig  # noqa: E402
from training.data import load_corpus  # noqa: E402
from training.loop import Trainer  # noqa: E402

CKPT_NAME = "ckpt.pt"
STEPS_LOG = "steps.log"
STARTS_LOG = "starts.log"
FINAL_JSON = "final.json"


def _append_line(path: Path, line: str) -> None:
    # Opened per line and flushed at once: the benchmark reads it while we run, and a SIGKILL
    # must not lose a step that completed.
    with open(path, "a", encoding="utf-8") as f:
        f.write(line + "\n")
        f.flush()


def save_checkpoint(trainer: Trainer, path: Path) -> None:
    """Write the full training state to `path` atomically (tmp + fsync + rename)."""
    tensors, meta = trainer.capture()
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        # The metadata as JSON text keeps the file loadable with weights_only=True.
        torch.save({"tensors": tensors, "meta_json": json.dumps(meta)}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    # fsync the folder too, or the rename itself may not survive a machine crash.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(trainer: Trainer, path: Path) -> int | None:
    """Restore `trainer` from `path` when it exists; returns the step resumed from, or None."""
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    trainer.restore(state["tensors"], json.loads(state["meta_json"]))
    return trainer.step


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="small", help="model preset (default small)")
    p.add_argument("--steps", type=int, required=True, help="total optimizer steps")
    p.add_argument("--ckpt-every", type=int, required=True, help="checkpoint interval in steps")
    p.add_argument("--threads", type=int, required=True, help="torch threads")
    p.add_argument("--data", help="corpus (default: the stdlib's source)")
    p.add_argument("--out", required=True, help="folder for checkpoint and logs")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()

    cfg = TrainConfig(model=a.model, steps=a.steps, torch_threads=a.threads, device="cpu").resolved()
    trainer = Trainer(cfg, load_corpus(a.data), device="cpu")
    resumed = load_checkpoint(trainer, out / CKPT_NAME)
    _append_line(out / STARTS_LOG, f"{pid} {T_PROCESS:.6f} {time.time():.6f} "
                                   f"{resumed if resumed is not None else -1}")

    loss = float("nan")
    while trainer.step < a.steps:
        result = trainer.train_step()
        loss = result.loss
        # Logged before the checkpoint, like Rebound's first_step_unix: the step is done here.
        # The step's own seconds too: the same number Rebound sums into productive_s.
        _append_line(out / STEPS_LOG, f"{trainer.step} {time.time():.6f} {pid} {result.seconds:.6f}")
        if trainer.step % a.ckpt_every == 0 or trainer.step == a.steps:
            save_checkpoint(trainer, out / CKPT_NAME)

    # Imported only now, so the restart path measured above carries no extra import.
    from storage.hashing import state_hash

    tensors, _ = trainer.capture()
    (out / FINAL_JSON).write_text(json.dumps({"final_step": trainer.step, "train_loss": loss,
                                              "state_hash": state_hash(tensors)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
