"""Held-out loss of a committed checkpoint, computed on a worker."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE

import tasks.engine_cache  # noqa: F401  (Prefect engine costs paid once per worker)
from storage import CheckpointRef, CorruptCheckpointError, open_store
from tasks.jobs import RunSpec
from tasks.train_batch_group import is_retryable
from tasks.worker_cache import WarmTrainer, drop_warm, put_warm, take_warm


def evaluate_checkpoint(run: RunSpec, ref_dict: dict[str, Any]) -> float:
    """Held-out loss of the checkpoint `ref_dict`; uses the warm trainer when it holds that state.

    Raises:
        CorruptCheckpointError: the checkpoint does not verify (the flow retrains it; a retry
            here would read the same bytes again).
    """
    from tasks.group_runner import build_trainer  # torch: on the worker only

    ref = CheckpointRef.from_dict(ref_dict)
    key = (run.run_id, run.config_hash)
    warm = take_warm(key)
    try:
        if warm is None or warm.at_ref != ref:
            ckpt = open_store(run.store_url).load(run.run_id, ref.step)
            trainer = warm.trainer if warm is not None else build_trainer(run)
            trainer.restore(ckpt.tensors, ckpt.metadata)
            warm = WarmTrainer(key, trainer, ckpt.ref, float(ckpt.metadata.get("productive_s", 0.0)))
        loss = float(warm.trainer.evaluate())
    except BaseException:
        drop_warm()  # a half-restored trainer matches no checkpoint
        raise
    put_warm(warm)
    return loss


def is_retryable_eval(task: Any, task_run: Any, state: Any) -> bool:
    """As for batch groups, and a corrupt checkpoint is not retried: rereading it cannot help."""
    try:
        state.result()
    except CorruptCheckpointError:
        return False
    except BaseException:
        return is_retryable(task, task_run, state)
    return True


@task(name="evaluate", retries=2, retry_delay_seconds=[1, 4], retry_condition_fn=is_retryable_eval,
      cache_policy=NO_CACHE, persist_result=False, task_run_name="eval @ {ref_dict[step]}")
def evaluate(run: RunSpec, ref_dict: dict[str, Any]) -> float:
    """Held-out loss at an epoch end."""
    return evaluate_checkpoint(run, ref_dict)
