"""Hot spares held warm: every idle worker of the run gets the run's corpus read, its trainer
built and the store checked before a failure needs it (tasks/spare_warmup.py).

A thread of the flow looks at the cluster every POLL and sends the warm-up to each worker it
has not warmed yet that is idle (a worker running a group is warm already); a worker that joins
later - a replacement, a restarted one - is warmed as soon as it is idle.
"""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

from distributed import Client

from tasks.jobs import RunSpec
from tasks.spare_warmup import warm_up_spare

POLL = timedelta(milliseconds=500)


class SpareWarmer:
    """Warms idle workers for one run; `warmed` maps worker -> what its warm-up took."""

    def __init__(self, client: Client, run: RunSpec) -> None:
        self.client = client
        self.run = run
        self.warmed: dict[str, dict[str, Any]] = {}
        self._futures: dict[str, Any] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="spare-warmer")

    def __enter__(self) -> SpareWarmer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        for fut in self._futures.values():
            try:
                fut.cancel()
            except Exception:  # noqa: BLE001 - its client may be closed: the cluster was lost
                # A warm-up still pending when the cluster was lost: its client was closed (the
                # run abandons a dead cluster's client), and cancelling through it raises
                # "IOLoop is closed". Nothing is left to cancel, and the run heals on.
                pass

    def _loop(self) -> None:
        while not self._stop.wait(POLL.total_seconds()):
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - a lost scheduler is the supervisor's to report
                continue

    def _tick(self) -> None:
        for worker, fut in list(self._futures.items()):
            if fut.status == "finished":
                self.warmed[worker] = fut.result()
                del self._futures[worker]
            elif fut.status in ("error", "cancelled"):
                del self._futures[worker]  # tried once; the worker is probed by its first group
        processing = self.client.processing()
        for worker, keys in processing.items():
            if keys or worker in self.warmed or worker in self._futures:
                continue
            # A plain Dask task pinned to the worker: a few ms of scheduling, no Prefect run.
            self._futures[worker] = self.client.submit(
                warm_up_spare, self.run, workers=[worker], allow_other_workers=False,
                pure=False, key=f"warm-spare-{worker}")

    def state(self) -> dict[str, dict[str, Any]]:
        """Per warmed worker: corpus_s, trainer_s, store_s, ready_unix."""
        return dict(self.warmed)
