"""flows/worker_forkserver.py on a GPU: a worker forked from the server that imported torch
trains on CUDA as a spawned one does. (Every end-to-end test forks its workers on the CPU;
test_summary_truth checks that a worker's parent is the forkserver.)"""

from __future__ import annotations

import json
import multiprocessing
import multiprocessing.forkserver
from pathlib import Path

import pytest
import torch

from flows.worker_forkserver import WORKER_PRELOAD


def _cuda_training_hash(corpus_path: str) -> str:
    """In a forked worker: three training steps of the tiny preset on CUDA."""
    from storage.hashing import state_hash
    from training.config import TrainConfig
    from training.data import load_corpus
    from training.loop import Trainer

    trainer = Trainer(TrainConfig(model="tiny", steps=3, device="cuda").resolved(),
                      load_corpus(Path(corpus_path)))
    trainer.train_until(3)
    return state_hash(trainer.capture()[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_worker_forked_from_the_warm_server_trains_on_cuda(tmp_path: Path) -> None:
    # The server imported torch (and its compiler stack) but never touched CUDA: a forked
    # worker initialises CUDA itself and trains exactly as a fresh process does.
    (tmp_path / "corpus.txt").write_bytes(Path(json.__file__).read_bytes()[:3000])
    multiprocessing.forkserver.set_forkserver_preload(list(WORKER_PRELOAD))
    with multiprocessing.get_context("forkserver").Pool(1) as pool:
        forked = pool.apply(_cuda_training_hash, (str(tmp_path / "corpus.txt"),))
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        spawned = pool.apply(_cuda_training_hash, (str(tmp_path / "corpus.txt"),))
    assert forked == spawned
