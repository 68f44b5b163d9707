"""Per-step progress from a worker to whoever watches the run (the local progress bar).

Events go through the Dask scheduler's event log (`Worker.log_event`), fire-and-forget, so a
slow or absent watcher never slows training. Outside a Dask worker they are dropped.
"""

from __future__ import annotations

import time
from typing import Any

PROGRESS_TOPIC = "rebound-progress"


def emit(run_id: str, **fields: Any) -> None:
    """Publish one progress event of run_id (no-op outside a Dask worker)."""
    try:
        from distributed import get_worker

        worker = get_worker()
    except (ImportError, ValueError):
        return
    # The worker's own clock: when it was last alive, however late the event is delivered.
    worker.log_event(PROGRESS_TOPIC, {"run_id": run_id, "worker": worker.address,
                                      "unix": time.time(), **fields})


def worker_name() -> str | None:
    """Address of the Dask worker running this code, None elsewhere."""
    try:
        from distributed import get_worker

        return str(get_worker().address)
    except (ImportError, ValueError):
        return None
