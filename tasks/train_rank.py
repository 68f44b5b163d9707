"""Prefect task over `rank_runner.run_rank`: one rank of a data-parallel batch group.

Not retried in place: a rank's peers cannot wait for it, so the flow re-forms the whole group
(flows/rank_group.py) and submits every rank again, each a task run of its own in the UI.
"""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

import tasks.engine_cache  # noqa: F401  (Prefect engine costs paid once per worker)
from tasks.rank_jobs import PeerLost, RankJob
from tasks.train_batch_group import quiet_one_line_failures

# A lost peer is an expected event the flow recovers from, and its message names the step and
# the failed collective: its traceback (the all_reduce inside the step) tells nobody anything.
quiet_one_line_failures(PeerLost)


@task(
    name="train-rank",
    retries=0,
    cache_policy=NO_CACHE,
    persist_result=False,
    task_run_name="steps {job.group.first_step}-{job.group.last_step} rank {job.name}",
)
def train_rank(job: RankJob) -> dict[str, Any]:
    """Train one rank's share of a batch group; return the group's checkpoint ref + metrics."""
    from tasks.rank_runner import run_rank  # the coordinator only submits this task

    return run_rank(job).to_dict()
