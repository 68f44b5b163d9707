"""Dask worker preload: pay for imports and AdamW's first use before the first task arrives.

STACK-NOTES: `import torch` ~2 s and the first AdamW step ~1.5 s (it loads torch._dynamo). A
worker that paid both at start-up, while the Prefect server is still starting, recovers faster.
"""

from __future__ import annotations

from tasks.priority import lower_for_boot, restore_normal

# Boot at low priority: a worker restarted after a crash must not slow the spare taking over.
lower_for_boot()

import torch  # noqa: E402

import storage  # noqa: E402, F401
import tasks.train_batch_group  # noqa: E402, F401  (imports prefect and the training loop)


def _warm_adamw() -> None:
    param = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.AdamW([param], lr=1e-3, foreach=False)
    param.sum().backward()
    opt.step()


def dask_setup(worker: object) -> None:
    """Called by Dask when the worker starts: warm up, then back to normal priority."""
    _warm_adamw()
    restore_normal()
