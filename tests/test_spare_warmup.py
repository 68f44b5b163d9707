"""Hot spares are warm before any failure (issue 9): corpus read, trainer built, store checked,
on a real Dask worker process; a group that lands there takes the built trainer."""

from __future__ import annotations

import time
from pathlib import Path

from flows.cluster import local_cluster
from flows.params import TrainParams
from flows.plan import build_plan
from flows.spares import SpareWarmer
from tasks.worker_cache import take_spare


def _spare_on_this_worker(run_id: str, config_hash: str) -> dict:
    import os

    trainer = take_spare((run_id, config_hash))
    again = take_spare((run_id, config_hash))  # handed out once
    return {"pid": os.getpid(), "built": trainer is not None, "again": again is not None,
            "step": trainer.step if trainer is not None else None}


def test_an_idle_worker_is_warmed_and_its_trainer_taken_once(tmp_path: Path,
                                                             corpus: Path) -> None:
    params = TrainParams(model="tiny", steps=10, data=str(corpus), store=str(tmp_path / "store"),
                         run_id="warm")
    run = build_plan(params).run
    with local_cluster(1, tmp_path / "dask", use_gpu=False) as cluster, \
            cluster.get_client() as client:
        [worker] = client.scheduler_info()["workers"]
        with SpareWarmer(client, run) as warmer:
            deadline = time.monotonic() + 120
            while worker not in warmer.state():  # the warm-up's result arriving
                assert time.monotonic() < deadline, "the idle worker was never warmed"
                time.sleep(0.05)
        warmed = warmer.state()[worker]
        assert warmed["newest_step"] is None  # the store answered: no checkpoint yet
        assert warmed["corpus_s"] >= 0 and warmed["trainer_s"] > 0
        got = client.submit(_spare_on_this_worker, run.run_id, run.config_hash,
                            workers=[worker], pure=False).result(timeout=60)
        assert got == {"pid": warmed["pid"], "built": True, "again": False, "step": 0}


def _unreachable(x: int) -> int:
    return x


def test_a_warm_up_pending_when_the_cluster_is_lost_does_not_fail_the_run(
        tmp_path: Path, corpus: Path) -> None:
    """A run that loses its cluster closes that cluster's client (ClusterWatch.abandon) before
    the warmer stops; a warm-up still pending then must not raise "IOLoop is closed" out of
    the run's clean-up (it failed a run that would have healed on a cluster of its own)."""
    params = TrainParams(model="tiny", steps=10, data=str(corpus), store=str(tmp_path / "store"),
                         run_id="warm")
    run = build_plan(params).run
    with local_cluster(1, tmp_path / "dask", use_gpu=False) as cluster, \
            cluster.get_client() as client:
        warmer = SpareWarmer(client, run).__enter__()
        # Pending for good: bound to a worker that does not exist.
        pending = client.submit(_unreachable, 1, workers=["tcp://127.0.0.1:9"],
                                allow_other_workers=False, pure=False)
        warmer._futures["tcp://127.0.0.1:9"] = pending
        assert pending.status == "pending"
        client.close(timeout=2)
        warmer.__exit__(None, None, None)
        assert not warmer._thread.is_alive()
