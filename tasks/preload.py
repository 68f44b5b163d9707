"""Dask worker preload: pay for imports and AdamW's first use before the first task arrives, and
probe the worker's health once it exists.

STACK-NOTES: `import torch` ~2 s and the first AdamW step ~1.5 s (it loads torch._dynamo). A
worker that paid both at start-up, while the Prefect server is still starting, recovers faster.
Both run at the lowest priority in a thread of their own (tasks/priority.py): a worker
restarted after a crash must not slow the spare taking over, and the threads that train stay
at normal priority without needing the privilege to raise it back.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from tasks.priority import BOOT_PRIORITY_ENV, run_at_low_priority


class OneLineHeartbeatFailure(logging.Filter):
    """A worker's heartbeat that meets a closed scheduler is logged in one line, without its
    traceback: at the end of a run (above all a failed one, which closes the cluster at once)
    the scheduler may close before its workers hear of it, and a lost scheduler mid-run is
    reported by the flow in one line of its own."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith("Failed to communicate with scheduler during heartbeat"):
            record.exc_info, record.exc_text = None, None
        return True


logging.getLogger("distributed.worker").addFilter(OneLineHeartbeatFailure())


def _boot() -> None:
    import torch

    import storage  # noqa: F401
    import tasks.group_runner  # noqa: F401  (the training loop; the task modules keep it lazy)
    import tasks.rank_runner  # noqa: F401
    import tasks.train_batch_group  # noqa: F401  (imports prefect)

    param = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.AdamW([param], lr=1e-3, foreach=False)
    param.sum().backward()
    opt.step()


def _at_boot_priority(work: Callable[[], Any]) -> None:
    if os.environ.get(BOOT_PRIORITY_ENV) == "normal":
        work()  # cold standby: this worker is the one the run waits for (flows/cluster.py)
    else:
        run_at_low_priority(work)


_at_boot_priority(_boot)


def dask_setup(worker: Any) -> None:
    """Dask calls this once the worker exists: the start-up health probe (DESIGN.md section 8).

    A worker that offers a GPU (the `GPU` resource) is probed on it, others on the CPU. A
    failure does not stop the worker from joining: it is recorded in tasks.health, and the
    first group the worker gets raises WorkerUnhealthy with it, so the flow quarantines the
    worker (with the probe's reason) and has it replaced.
    """
    from tasks import health

    use_cuda = "GPU" in worker.state.total_resources
    _at_boot_priority(lambda: health.start_probe(use_cuda))
