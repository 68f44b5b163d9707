"""Submit a task to the cluster and see it through infrastructure failures.

A lost worker is Dask's to handle (it reruns the task elsewhere) until the task has killed
`allowed-failures` workers: then Dask raises KilledWorker, Prefect's retries do not apply, and
the task run would stay Running forever (prefect#12968, prefect-dask#59). Here that is an
infrastructure failure: the stale task run is marked Crashed so the UI shows the truth, and the
group is submitted again, up to a budget.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from distributed.client import FutureCancelledError
from distributed.comm.core import CommClosedError
from distributed.scheduler import KilledWorker
from prefect.client.orchestration import get_client
from prefect.states import Crashed

from flows.supervise import ClusterWatch, InfrastructureError, TaskStranded, Watchdog, supervise
from tasks.health import WorkerUnhealthy

INFRA_ERRORS = (KilledWorker, CommClosedError, FutureCancelledError, asyncio.CancelledError,
                ConnectionError)


def mark_crashed(task_run_id: Any, message: str) -> None:
    """Force a task run whose worker is gone into Crashed (it would stay Running)."""
    with get_client(sync_client=True) as client:
        client.set_task_run_state(task_run_id, Crashed(message=message), force=True)


RESULT_WAIT_S = 10.0
"""How long to wait for a finished task's result before watching the task again."""

RESULT_FETCH_TRIES = 6
"""Fetches of a finished task's result that may time out (its result lost with its worker each
time) before the task is given up as stranded and resubmitted (counted against the budget)."""


def _result_supervised(future: Any, watch: ClusterWatch, dog: Watchdog, what: str) -> Any:
    """The task's result. A finished task's result can still be lost with its worker before it
    is fetched; Dask then reschedules the task and the fetch would wait forever for a worker.
    So the fetch has a timeout, and on it the (rescheduled) task is supervised again, a bounded
    number of times.

    A TimeoutError is also what a task raises on its own (an OSError: a socket or a lock that
    timed out). That one comes with the Dask future done, and is the task's error: it goes up
    as such (Prefect has already applied the task's retries), never taken for a slow fetch.

    Raises:
        TaskStranded: the result could not be fetched RESULT_FETCH_TRIES times.
    """
    for _ in range(RESULT_FETCH_TRIES):
        supervise(future.wrapped_future, watch, dog, what)
        try:
            return future.result(timeout=RESULT_WAIT_S)
        except TimeoutError:
            if future.wrapped_future.done():
                # The future is done, so this did not come from waiting on it: the task's
                # own TimeoutError. Asking once more raises it again at once (or, had the task
                # finished just as the wait ran out, returns its result).
                return future.result(timeout=RESULT_WAIT_S)
    raise TaskStranded(f"{what}: its result was lost {RESULT_FETCH_TRIES} times before it "
                       f"could be fetched")


def _count_failed_groups(watch: ClusterWatch, since_unix: float, succeeded: Any) -> None:
    """Error monitoring: every attempt of this group that failed counts against its worker
    (flows.supervise.ClusterWatch.count_failure). Prefect retries a raising task in place and
    reports only the last try, so the attempts are read from the tasks' own progress events:
    each attempt but the one that returned `succeeded` failed on its worker."""
    ok = succeeded.get("attempt") if isinstance(succeeded, dict) else None
    for attempt, worker in watch.attempts_since(since_unix).items():
        if attempt != ok:
            watch.count_failure(worker, "task-error")


def submit_supervised(submit: Callable[[], Any],
                      placement: Callable[[bool], AbstractContextManager],
                      watch: ClusterWatch, dog: Watchdog, what: str, budget: int,
                      on_infra_failure: Callable[[str, str], None]) -> Any:
    """Run submit() under supervision; resubmit after infrastructure failures, up to budget.

    `placement(pinned)` gives the Dask annotations to submit under; after a stranded task the
    resubmission is not pinned to a worker.

    Raises:
        InfrastructureError: the budget is spent, or the cluster itself is gone.
    """
    failures = 0
    pinned = True
    since = time.time()
    while True:
        try:
            with placement(pinned):
                future = submit()
        except (*INFRA_ERRORS, OSError, TimeoutError) as err:
            # Submitting needs the scheduler: a lost cluster shows up here as a connect error.
            watch.ensure_scheduler(dog.scheduler_timeout, what)
            failures += 1
            on_infra_failure("submit-failed", f"{type(err).__name__}: {err}")
            if failures > budget:
                raise InfrastructureError(f"{what}: could not submit: {err}") from None
            continue
        try:
            result = _result_supervised(future, watch, dog, what)
            _count_failed_groups(watch, since, result)
            return result
        except TaskStranded as err:
            future.wrapped_future.cancel()
            try:
                mark_crashed(future.task_run_id, str(err))
            except Exception:  # noqa: BLE001 - the UI fix is best-effort; the run goes on
                pass
            pinned = False
            failures += 1
            on_infra_failure("stranded-task", str(err))
            if failures > budget:
                raise InfrastructureError(f"{what}: {err}") from None
        except WorkerUnhealthy as err:
            # Redundancy: take the worker out of the cluster; a spare (or any other) takes over.
            if err.worker:
                watch.quarantine(err.worker, err.reason)
            failures += 1
            on_infra_failure("unhealthy-worker", str(err))
            if failures > budget:
                raise InfrastructureError(f"{what}: no healthy worker; last: {err}") from None
        except InfrastructureError as err:
            try:
                mark_crashed(future.task_run_id, f"infrastructure failure: {err}")
            except Exception:  # noqa: BLE001 - the API may be as gone as the cluster
                pass
            raise
        except INFRA_ERRORS as err:
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else what}"
            try:
                mark_crashed(future.task_run_id, f"infrastructure failure: {reason}")
            except Exception:  # noqa: BLE001 - the UI fix is best-effort; the run goes on
                pass
            failures += 1
            on_infra_failure("killed-worker", reason)
            if failures > budget:
                raise InfrastructureError(f"{what} failed {failures} times on lost workers; "
                                          f"last: {reason}") from None
        except Exception:
            # The group failed past its retries (its epoch is retried): each try counts.
            _count_failed_groups(watch, since, None)
            raise
