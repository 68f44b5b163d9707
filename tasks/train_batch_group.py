"""Prefect task over `group_runner.run_group`: retries with backoff, never retrying config errors
or a storage that refuses for good (a full disk)."""

from __future__ import annotations

import logging
from typing import Any

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

import tasks.engine_cache  # noqa: F401  (Prefect engine costs paid once per worker)
from storage import FatalStoreError
from tasks.health import WorkerUnhealthy
from tasks.jobs import GroupJob

ONE_LINE_ERRORS: tuple[type[BaseException], ...] = (FatalStoreError,)
"""Failures whose one-line message says everything: Prefect logs them without a traceback."""


class OneLineFailures(logging.Filter):
    """Drops the traceback Prefect attaches to a failed run's log record when the failure is
    one the user acts on from its message alone (a full disk is not a bug to debug)."""

    def __init__(self) -> None:
        super().__init__()
        self.kinds: set[type[BaseException]] = set(ONE_LINE_ERRORS)

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and isinstance(exc, tuple(self.kinds)):
            record.exc_info, record.exc_text = None, None
        return True


_ONE_LINE = OneLineFailures()


def quiet_one_line_failures(*kinds: type[BaseException]) -> None:
    """Log these failures (and ONE_LINE_ERRORS) without traceback in Prefect's run loggers."""
    _ONE_LINE.kinds.update(kinds)
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if _ONE_LINE not in logger.filters:
            logger.addFilter(_ONE_LINE)


quiet_one_line_failures()  # workers import this module (preload, task deserialisation)


def is_retryable(task: Any, task_run: Any, state: Any) -> bool:
    """Retry in place, except a configuration error (ValueError/TypeError: fails at once), an
    unhealthy worker (the flow quarantines it and resubmits elsewhere) and a storage that
    refuses for good (full, read-only, no permission: no retry can help)."""
    try:
        state.result()
    except (ValueError, TypeError, WorkerUnhealthy, FatalStoreError):
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
    # Imported here, where it runs: the coordinator imports this module only to submit the task
    # (workers import the runner with their preload, WORKER_RUNNERS).
    from tasks.group_runner import run_group

    return run_group(job).to_dict()
