"""A hot spare gets ready before it is needed: the run's corpus read, its trainer built, the
store reached and the newest checkpoint's manifest checked - so that taking a lost rank's place
costs a restore and a step, not a start-up.

Runs as a plain Dask task on each idle worker (flows/spares.py submits it); the trainer waits
in tasks.worker_cache until a group on this worker takes it (`take_spare`).
"""

from __future__ import annotations

import os
import time
from typing import Any

from storage import open_store
from tasks import progress
from tasks.jobs import RunSpec
from tasks.worker_cache import corpus_for, put_spare
from training.config import TrainConfig


def warm_up_spare(run: RunSpec) -> dict[str, Any]:
    """Make this worker a warm spare for `run`; returns what each part took (seconds)."""
    from training.loop import Trainer  # here: the coordinator imports this module to submit it

    t0 = time.perf_counter()
    corpus = corpus_for(run.data_path)
    t1 = time.perf_counter()
    trainer = Trainer(TrainConfig(**run.train_config).resolved(), corpus, device=run.device)
    put_spare((run.run_id, run.config_hash), trainer)
    t2 = time.perf_counter()
    # "State loadable": the store answers and the newest checkpoint's files check out
    # (manifest, marker, sizes: no chunk read).
    newest = open_store(run.store_url).latest_committed_ref(run.run_id)
    t3 = time.perf_counter()
    return {"worker": progress.worker_name(), "pid": os.getpid(), "corpus_s": round(t1 - t0, 3),
            "trainer_s": round(t2 - t1, 3), "store_s": round(t3 - t2, 3),
            "newest_step": newest.step if newest is not None else None,
            "ready_unix": time.time()}
