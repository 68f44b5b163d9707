"""Prefect task over `group_runner.run_group`: retries with backoff, never retrying config errors."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

from tasks.group_runner import run_group
from tasks.health import WorkerUnhealthy
from tasks.jobs import GroupJob


def is_retryable(task: Any, task_run: Any, state: Any) -> bool:
    """Retry in place, except a configuration error (ValueError/TypeError: fails at once) and an
    unhealthy worker (the flow quarantines it and resubmits elsewhere)."""
    try:
        state.result()
    except (ValueError, TypeError, WorkerUnhealthy):
        return False
    except BaseException:
        return True
    return True


@task(
    name="train-batch-group",
    retries=2,
    retry_delay_seconds=[1, 4, 16],
    retry_jitter_factor=0.2,
    retry_condition_fn=is_retryable,
    cache_policy=NO_CACHE,
    persist_result=False,
    task_run_name="steps {job.first_step}-{job.last_step}",
)
def train_batch_group(job: GroupJob) -> dict[str, Any]:
    """Train one batch group from its newest verified checkpoint; return its checkpoint ref + metrics."""
    return run_group(job).to_dict()
