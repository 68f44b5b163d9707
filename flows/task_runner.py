"""The flows' Dask task runner: prefect_dask's DaskTaskRunner, minus two costs it pays at every
submission that a batch group pays between its predecessor's end and its own start.

- Dask's `pure=True` default tokenizes what is submitted: it cloudpickles the task's wrapper
  and its parameters only to name the key. Every submission is a new task run (a new id in its
  arguments), so the name can never be shared: a random key (`pure=False`) says the same.
- Prefect serializes the whole settings model into every task's context (hundreds of fields
  through `visit_collection`: 40 ms idle here, twice that with both cores training). A
  SettingsContext's settings do not change while it is current, so its serialization is kept
  for as long as the same settings object is.

Measured with 40 groups of 5 tiny steps (one worker, 2 cores): the median gap from a group's
end to the next group's start went from 0.27-0.29 s to 0.19-0.21 s, the run's orchestration
time from 11.7-12.9 s to 8.6-8.9 s.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from prefect.context import SettingsContext
from prefect_dask import DaskTaskRunner
from prefect_dask.task_runners import PrefectDaskFuture

import tasks.engine_cache  # noqa: F401  (the coordinator's API clients share TLS contexts too)

_serialize_settings = SettingsContext.serialize
_serialized: dict[tuple[int, bool], tuple[Any, Any, dict[str, Any]]] = {}
_serialized_lock = threading.Lock()
SERIALIZED_KEPT = 8
"""Settings contexts whose serialization is kept (a run has one or two at a time)."""


def _serialize_settings_once(self: SettingsContext, include_secrets: bool = True
                             ) -> dict[str, Any]:
    key = (id(self), include_secrets)
    with _serialized_lock:
        kept = _serialized.get(key)
    # The kept entry holds its settings and profile alive, so identity cannot be reused.
    if kept is not None and kept[0] is self.settings and kept[1] is self.profile:
        return kept[2]
    serialized = _serialize_settings(self, include_secrets=include_secrets)
    with _serialized_lock:
        while len(_serialized) >= SERIALIZED_KEPT:
            _serialized.pop(next(iter(_serialized)))
        _serialized[key] = (self.settings, self.profile, serialized)
    return serialized


SettingsContext.serialize = _serialize_settings_once  # type: ignore[method-assign]


class ReboundTaskRunner(DaskTaskRunner):
    """DaskTaskRunner that submits with a random key (no tokenizing)."""

    def submit(self, task: Any, parameters: dict[str, Any],  # type: ignore[override]
               wait_for: Iterable[Any] | None = None,
               dependencies: dict[str, Any] | None = None) -> PrefectDaskFuture:
        if not self._started:
            raise RuntimeError("The task runner must be started before submitting work.")
        from flows.cluster import cluster_gone

        # A client's first connection to a scheduler that is stopped waits for it forever.
        if self.address and (gone := cluster_gone(self.address)):
            raise ConnectionError(gone)
        parameters = self._optimize_futures(parameters)
        wait_for = self._optimize_futures(wait_for) if wait_for else None
        future = self.client.submit(task, parameters=parameters, wait_for=wait_for,
                                    dependencies=dependencies, return_type="state", pure=False)
        return PrefectDaskFuture(wrapped_future=future, task_run_id=future.task_run_id)
