"""SLURM: one batch job per Dask worker, each with one GPU (dask-jobqueue, the `slurm` extra).

`make_cluster()` builds the cluster object; it starts a Dask scheduler in this process and
submits nothing until `scale(n)`. Partition, account and the like come from dask-jobqueue's
own configuration (`~/.config/dask/jobqueue.yaml` or `DASK_JOBQUEUE__SLURM__QUEUE=gpu`), or as
keyword overrides. See deployments/multi-machine.md for how a run uses it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dask
from dask_jobqueue import SLURMCluster

from flows.cluster import dask_settings

PROJECT = Path(__file__).resolve().parents[2]
"""The checkout the jobs run from: the same path on every node (a shared filesystem)."""


def make_cluster(**overrides: Any) -> SLURMCluster:
    """A SLURMCluster whose jobs are Rebound workers; keyword arguments override the defaults."""
    options: dict[str, Any] = {
        # One Dask thread per worker: a worker runs one batch group (or one rank) at a time.
        "cores": 1,
        "processes": 1,
        # CPUs SLURM reserves for the job: torch's own threads (pass --threads 8 to the flow;
        # its default is counted on the flow's machine, not on the node).
        "job_cpu": 8,
        "memory": "64GB",
        "walltime": "24:00:00",
        # One GPU per job, offered to the scheduler as the GPU resource Rebound's tasks ask for
        # on CUDA; the preload warms torch and probes the GPU before the first task arrives.
        "job_extra_directives": ["--gres=gpu:1"],
        "worker_extra_args": ["--resources", "GPU=1", "--preload", "tasks.preload"],
        "job_script_prologue": [f"cd {PROJECT}", "source .venv/bin/activate",
                                "export DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED=False"],
        "python": "python",
        # The scheduler lives in the flow's process on the submit host; its dashboard too.
        # On a multi-NIC login node add "interface": "ib0" (the network the nodes reach).
        "scheduler_options": {"dashboard_address": ":8787"},
        "log_directory": str(PROJECT / ".rebound" / "slurm-logs"),
    }
    options.update(overrides)
    # The scheduler starts here, in this process: it takes Rebound's scheduler settings (no
    # work stealing, worker TTL, allowed failures) as a LocalCluster of the CLI does.
    with dask.config.set(dask_settings()):
        return SLURMCluster(**options)
