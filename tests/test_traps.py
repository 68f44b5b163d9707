"""A known trap of Prefect + Dask, reproduced on a real cluster: a completed task is run again
when the worker holding its result dies (PrefectHQ/prefect#15442). Rebound's results live in
the store, so the rerun finds its checkpoint committed and trains nothing."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
from distributed import Client, LocalCluster
from prefect import flow
from prefect_dask import DaskTaskRunner

from storage import open_store
from tasks.jobs import GroupJob, RunSpec
from tasks.train_batch_group import train_batch_group
from training.config import TrainConfig
from training.data import load_corpus

pytestmark = pytest.mark.slow


@flow
def group_then_worker_dies(job: GroupJob, scheduler_address: str) -> tuple[dict, dict]:
    """Run a group, SIGKILL the worker that holds its result, run the same group again."""
    done = train_batch_group.submit(job).result()
    holder = done["worker"]
    with Client(scheduler_address, set_as_default=False) as client:
        pid = client.run(os.getpid, workers=[holder])[holder]
    os.kill(pid, signal.SIGKILL)
    again = train_batch_group.submit(job).result()
    return done, again


def test_completed_group_is_not_trained_again_when_its_worker_dies(
        prefect_api: str, tmp_path: Path, corpus: Path) -> None:
    cfg = TrainConfig(model="tiny", steps=40, torch_threads=1, device="cpu")
    run = RunSpec(run_id="trap", store_url=str(tmp_path / "store"), train_config=cfg.to_dict(),
                  data_path=str(corpus), config_hash=cfg.config_hash(load_corpus(corpus).fingerprint),
                  device="cpu")
    job = GroupJob(run, 0, 10, 5)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster:
        runner = DaskTaskRunner(address=cluster.scheduler_address)
        done, again = group_then_worker_dies.with_options(task_runner=runner)(
            job, cluster.scheduler_address)
    assert done["steps_trained"] == 10 and not done["reused"]
    assert again["reused"] and again["steps_trained"] == 0
    assert again["ref"] == done["ref"]
    attempts = open_store(str(tmp_path / "store")).list_json("trap", "attempts")
    assert len(attempts) == 1  # trained exactly once
