"""Rank processes for the data-parallel tests: real processes, real gloo, real training."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any

from storage.hashing import state_hash
from training.config import TrainConfig
from training.data import load_corpus
from training.distributed import CollectiveError, RankGroup, Rendezvous
from training.loop import Trainer


def short_corpus(folder: str):
    path = Path(folder) / "short.txt"
    if not path.exists():
        path.write_bytes(Path(json.__file__).read_bytes()[:6000])
    return load_corpus(path)


def tiny_cfg(steps: int = 20):
    return TrainConfig(model="tiny", steps=steps, torch_threads=1).resolved()


def _hash(trainer: Trainer) -> str:
    return state_hash(trainer.capture()[0])


def run_rank(rdv: dict[str, Any], rank: int, folder: str, plan: dict[str, Any], out) -> None:
    """Train as one rank following `plan`; put a result dict on `out`.

    plan keys: steps (train together until), forget_at (this rank drops its state at that
    step and receives it back from rank 0), die_after (this rank SIGKILLs itself after that
    step), extra_steps (after a peer's death, try this many more).
    """
    corpus = short_corpus(folder)
    group = RankGroup(Rendezvous.from_dict(rdv), rank)
    trainer = Trainer(tiny_cfg(), corpus, sync=group)
    result: dict[str, Any] = {"rank": rank, "losses": [], "pid": os.getpid()}
    forget_at = plan.get("forget_at")
    die_after = plan.get("die_after")
    while trainer.step < plan["steps"]:
        result["losses"].append(trainer.train_step().loss)
        if forget_at is not None and trainer.step == forget_at:
            result[f"hash_at_{forget_at}"] = _hash(trainer)
            if rank == 1:
                trainer = Trainer(tiny_cfg(), corpus, sync=group)  # a replacement: fresh state
                result["fresh_hash"] = _hash(trainer)
            group.broadcast_state(trainer, src=0)
            result["hash_after_broadcast"] = _hash(trainer)
        if die_after is not None and trainer.step == die_after:
            if rank == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            result["hash_before_failed_step"] = _hash(trainer)
            started = time.monotonic()
            try:
                trainer.train_step()
                result["error"] = None
            except CollectiveError as err:
                result["error"] = str(err)
            result["failed_after_s"] = time.monotonic() - started
            result["step_after_failure"] = trainer.step
            result["hash_after_failure"] = _hash(trainer)
            break
    result["step"] = trainer.step
    result["hash"] = _hash(trainer)
    if die_after is None:
        result["gathered"] = group.all_gather_text(result["hash"])
        result["receipts"] = group.all_gather_json({"rank": rank, "pad": "x" * (rank * 300)})
        result["from_last"] = group.broadcast_json({"chosen": rank}, src=group.world_size - 1)
    group.close()
    out.put(result)


def serve_jobs(folder: str, store: str, jobs, out) -> None:
    """A stand-in for a Dask worker process: runs rank jobs from `jobs` one after another in
    this one process (so warm state carries over), results or errors onto `out`."""
    from tasks.jobs import GroupJob, RunSpec
    from tasks.rank_runner import PeerLost, RankJob, run_rank

    corpus_path = Path(folder) / "short.txt"
    short_corpus(folder)
    run = RunSpec("dp", store, _train_config(), str(corpus_path), "cfg")
    while True:
        job = jobs.get()
        if job is None:
            return
        rdv, rank, first, last, chaos = job
        try:
            result = run_rank(RankJob(GroupJob(run, first, last, 5), rank, rdv["world_size"], rdv,
                                      tuple(tuple(c) for c in chaos)))
            out.put(("ok", rank, result.to_dict()))
        except PeerLost as err:
            out.put(("peer-lost", rank, {"step": err.step, "reason": err.reason}))
        except Exception as err:  # noqa: BLE001 - reported to the test as data
            out.put(("error", rank, {"error": f"{type(err).__name__}: {err}"}))


def _train_config() -> dict[str, Any]:
    from training.config import TrainConfig

    return TrainConfig(model="tiny", steps=40, torch_threads=1).to_dict()
