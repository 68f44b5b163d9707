"""Contender (b) of bench.recovery: the training script a PyTorch user would run under torchrun.

    torchrun --standalone --nproc-per-node=1 --max-restarts=3 bench/torchrun_train.py \\
        --model small --steps 60 --ckpt-every 10 --threads 2 --out DIR

With --nproc-per-node 2 (torchrun's WORLD_SIZE > 1) it trains data-parallel: every rank joins
torch.distributed over gloo (torchrun's env:// rendezvous), takes its equal share of the same
global batch, and averages gradients with one all_reduce per step. The averaging is Rebound's own
(RankGroup.average_gradients: one flat buffer per dtype), not DistributedDataParallel's buckets,
so both reach the same bits; the cost is the same one collective per step. Rank 0 alone logs and
checkpoints; when any rank dies the elastic agent stops the others and restarts all of them from
that checkpoint.

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
  ranks.log        one line per process start: "rank pid" (the benchmark kills a rank by PID)
  evals.log        with --evaluate: one line per evaluation, "step unix_time seconds eval_loss"
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
from training.distributed import RankGroup  # noqa: E402
from training.loop import Trainer  # noqa: E402

CKPT_NAME = "ckpt.pt"
STEPS_LOG = "steps.log"
STARTS_LOG = "starts.log"
FINAL_JSON = "final.json"
RANKS_LOG = "ranks.log"
EVALS_LOG = "evals.log"


class TorchrunGroup:
    """This rank's share of torchrun's process group, in the shape Trainer's `sync` expects."""

    def __init__(self, rank: int, world_size: int) -> None:
        import torch.distributed as dist

        # As Rebound's ranks (training/distributed.py): on one machine gloo must use loopback,
        # or a restarted group can wait forever to connect over another interface.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        # torchrun keeps one store across restarts: without a prefix per restart round, the
        # restarted ranks read the dead round's addresses and fail to connect (measured).
        from datetime import timedelta

        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                              is_master=False, timeout=timedelta(seconds=60))
        round_ = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group("gloo", store=dist.PrefixStore(f"round{round_}/", store),
                                rank=rank, world_size=world_size)
        self.rank, self.world_size, self.device = rank, world_size, torch.device("cpu")

    # The same gradient averaging as Rebound's ranks, so the two reach the same weights.
    average_gradients = RankGroup.average_gradients

    def _all_reduce(self, t: torch.Tensor) -> None:
        import torch.distributed as dist

        dist.all_reduce(t)


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
    p.add_argument("--evaluate", action="store_true",
                   help="rank 0 evaluates at every epoch's end and at the last step, as "
                        "python -m flows.train does (the same held-out batches)")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    pid = os.getpid()
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    _append_line(out / RANKS_LOG, f"{rank} {pid}")

    cfg = TrainConfig(model=a.model, steps=a.steps, torch_threads=a.threads, device="cpu").resolved()
    sync = TorchrunGroup(rank, world_size) if world_size > 1 else None
    trainer = Trainer(cfg, load_corpus(a.data), device="cpu", sync=sync)
    # Every rank loads the same checkpoint (rank 0 wrote it whole), so all start equal.
    resumed = load_checkpoint(trainer, out / CKPT_NAME)
    lead = rank == 0
    if lead:
        _append_line(out / STARTS_LOG, f"{pid} {T_PROCESS:.6f} {time.time():.6f} "
                                       f"{resumed if resumed is not None else -1}")

    loss = float("nan")
    while trainer.step < a.steps:
        result = trainer.train_step()
        loss = result.loss
        # Logged before the checkpoint, like Rebound's first_step_unix: the step is done here.
        # The step's own seconds too: the same number Rebound sums into productive_s.
        if not lead:
            continue
        _append_line(out / STEPS_LOG, f"{trainer.step} {time.time():.6f} {pid} {result.seconds:.6f}")
        if a.evaluate and (trainer.step % trainer.batches_per_epoch == 0 or trainer.step == a.steps):
            # Rank 0 alone, as Rebound evaluates once per epoch end; the other ranks wait for
            # it at the next step's all_reduce, as Rebound's ranks wait for the evaluation task.
            t0 = time.perf_counter()
            eval_loss = trainer.evaluate()
            _append_line(out / EVALS_LOG, f"{trainer.step} {time.time():.6f} "
                                          f"{time.perf_counter() - t0:.6f} {eval_loss:.6f}")
        if trainer.step % a.ckpt_every == 0 or trainer.step == a.steps:
            save_checkpoint(trainer, out / CKPT_NAME)

    # Imported only now, so the restart path measured above carries no extra import.
    from storage.hashing import state_hash

    if not lead:
        return 0
    tensors, _ = trainer.capture()
    (out / FINAL_JSON).write_text(json.dumps({"final_step": trainer.step, "train_loss": loss,
                                              "state_hash": state_hash(tensors)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
