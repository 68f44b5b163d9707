"""Dask worker preload: pay for imports and AdamW's first use before the first task arrives.

STACK-NOTES: `import torch` ~2 s and the first AdamW step ~1.5 s (it loads torch._dynamo). A
worker that paid both at start-up, while the Prefect server is still starting, recovers faster.
Both run at the lowest priority in a thread of their own (tasks/priority.py): a worker
restarted after a crash must not slow the spare taking over, and the threads that train stay
at normal priority without needing the privilege to raise it back.
"""

from __future__ import annotations

from tasks.priority import run_at_low_priority


def _boot() -> None:
    import torch

    import storage  # noqa: F401
    import tasks.train_batch_group  # noqa: F401  (imports prefect and the training loop)

    param = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.AdamW([param], lr=1e-3, foreach=False)
    param.sum().backward()
    opt.step()


run_at_low_priority(_boot)
