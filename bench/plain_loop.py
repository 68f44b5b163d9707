"""Contender (a) of bench.overhead: the plain single-process torch loop a user would write.

Same model, data, device, steps and checkpoint interval as Rebound, and the same held-out
evaluation at each epoch end; checkpoints with `torch.save` to a temporary file, fsync, rename,
fsync of the folder (the usual safe pattern). Prints one JSON line of timings.

Its timed window matches Rebound's: it opens once the model is built and AdamW's first use has
been paid (Rebound's workers pay it while booting, tasks/preload.py), and closes after the final
evaluation and the final checkpoint's commit.
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


def warm_adamw() -> None:
    """AdamW's first step ever in a process loads torch._dynamo (~1.5 s): pay it outside the
    window, exactly as Rebound's worker preload does (tasks/preload.py `_warm_adamw`)."""
    param = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.AdamW([param], lr=1e-3, foreach=False)
    param.sum().backward()
    opt.step()


def _save(trainer: Trainer, path: str) -> None:
    tmp = f"{path}.tmp"
    state = {"model": trainer.model.state_dict(), "optim": trainer.optimizer.state_dict(),
             "step": trainer.step}
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    # The rename is durable only once its folder is (Rebound's commit fsyncs it too).
    dir_fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="small")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--ckpt-every", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--data")
    p.add_argument("--out", required=True)
    p.add_argument("--started", type=float, default=T_PROCESS)
    a = p.parse_args()
    cfg = TrainConfig(model=a.model, steps=a.steps, torch_threads=a.threads, device=a.device).resolved()
    trainer = Trainer(cfg, load_corpus(a.data), device=a.device)
    warm_adamw()
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
                      "final_loss": loss, "device": str(trainer.device),
                      "window_start_unix": first_step_at, "window_end_unix": end}))


if __name__ == "__main__":
    main()
