"""Contender (a) of bench.overhead: the plain single-process torch loop a user would write.

Same model, data, steps and checkpoint interval as Rebound, and the same held-out evaluation at
each epoch end; checkpoints with `torch.save` to a temporary file, fsync, rename (the usual safe
pattern). Prints one JSON line of timings.
"""

from __future__ import annotations

import argparse
import json
import os
import time

T_PROCESS = time.time()

import torch  # noqa: E402

from training.config import TrainConfig  # noqa: E402
from training.data import load_corpus  # noqa: E402
from training.loop import Trainer  # noqa: E402


def _save(trainer: Trainer, path: str) -> None:
    tmp = f"{path}.tmp"
    state = {"model": trainer.model.state_dict(), "optim": trainer.optimizer.state_dict(),
             "step": trainer.step}
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="small")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--ckpt-every", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--data")
    p.add_argument("--out", required=True)
    p.add_argument("--started", type=float, default=T_PROCESS)
    a = p.parse_args()
    cfg = TrainConfig(model=a.model, steps=a.steps, torch_threads=a.threads, device="cpu").resolved()
    trainer = Trainer(cfg, load_corpus(a.data), device="cpu")
    first_step_at = time.time()
    ckpt_s, loss = 0.0, float("nan")
    epoch_steps = trainer.batches_per_epoch
    while trainer.step < a.steps:
        loss = trainer.train_step().loss
        if trainer.step % epoch_steps == 0 or trainer.step == a.steps:
            trainer.evaluate()
        if trainer.step % a.ckpt_every == 0 or trainer.step == a.steps:
            t0 = time.perf_counter()
            _save(trainer, os.path.join(a.out, "ckpt.pt"))
            ckpt_s += time.perf_counter() - t0
    end = time.time()
    print(json.dumps({"startup_s": first_step_at - a.started, "train_wall_s": end - first_step_at,
                      "tokens": a.steps * trainer.tokens_per_step, "ckpt_s": ckpt_s,
                      "final_loss": loss}))


if __name__ == "__main__":
    main()
