"""`python -m flows.train`: the Rebound training flow.

Reads top to bottom: plan the run, find the newest verified checkpoint, start (or join) the Dask
cluster, train epoch by epoch in batch-group tasks, evaluate at epoch ends, report.
"""

from __future__ import annotations

if __name__ == "__main__":
    # Prefect reads its settings from the environment when imported: set them first.
    from flows.prefect_env import prepare_environment

    _SERVER_PORT = prepare_environment()

import contextlib  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterator  # noqa: E402
from typing import Any  # noqa: E402

import dask  # noqa: E402
from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from prefect_dask import DaskTaskRunner  # noqa: E402
from rich.console import Console  # noqa: E402

from flows.cluster import cuda_available, local_cluster  # noqa: E402
from flows.failures import collect_failures  # noqa: E402
from flows.params import TrainParams  # noqa: E402
from flows.plan import (  # noqa: E402
    Group,
    RunPlan,
    build_plan,
    check_store,
    run_record,
    young_daly_interval,
)
from flows.prefect_env import rebound_home  # noqa: E402
from flows.report import RunTally, build_summary, summary_markdown  # noqa: E402
from storage import CheckpointRef, open_store  # noqa: E402
from tasks.evaluate import evaluate  # noqa: E402
from tasks.jobs import GroupJob  # noqa: E402
from tasks.train_batch_group import train_batch_group  # noqa: E402

console = Console(stderr=True)


@contextlib.contextmanager
def _cluster_address(params: TrainParams, use_gpu: bool) -> Iterator[str]:
    if params.cluster:
        yield params.cluster
        return
    n = params.workers + params.spares if params.standby == "hot" else params.workers
    with local_cluster(n, rebound_home() / "dask", use_gpu) as cluster:
        yield cluster.scheduler_address


def _say(message: str) -> None:
    get_run_logger().info(message)
    console.print(message)


@flow(name="rebound-epoch", log_prints=False, retries=1, validate_parameters=False)
def train_epoch(plan: RunPlan, params: TrainParams, groups: list[Group], start_ref: dict | None,
                use_gpu: bool, deadline_unix: float | None) -> dict[str, Any]:
    """Train one epoch's batch groups in order and evaluate at its end; retried as a whole.

    A retry re-submits every group, and each group whose checkpoint is already committed
    returns it at once, so an epoch retry only trains what was lost.
    """
    out: dict[str, Any] = {"ref": start_ref, "stopped": None, "checkpoints": 0, "stall_s": 0.0,
                           "losses": [], "evals": []}
    last_worker: str | None = None
    protect = tuple(sorted({g.last_step for g in plan.groups if g.epoch_end}))
    task = train_batch_group.with_options(retries=params.retries)
    for group in groups:
        if deadline_unix is not None and time.time() >= deadline_unix:
            out["stopped"] = f"time budget {params.time_budget} spent"
            return out
        job = GroupJob(plan.run, group.first_step, group.last_step, plan.ckpt_every,
                       protect, deadline_unix)
        placement: dict[str, Any] = {"resources": {"GPU": 1}} if use_gpu else {}
        if last_worker:
            # Keep the run on the worker whose memory already holds its state (warm cache).
            placement.update(workers=[last_worker], allow_other_workers=True)
        with dask.annotate(**placement):
            result = task.submit(job).result()
        out["ref"], last_worker = result["ref"], result.get("worker")
        out["checkpoints"] += len(result["checkpoints"])
        out["stall_s"] += result["ckpt_s"]
        out["losses"] += [tuple(x) for x in result["losses"]]
        for line in result["corrupt"]:
            _say(f"[yellow]skipped corrupt checkpoint: {line}")
        if plan.ckpt_auto and result["steps_trained"] and result["checkpoints"]:
            plan.ckpt_every = young_daly_interval(
                result["ckpt_s"] / len(result["checkpoints"]), params.mtbf_s,
                result["train_s"] / result["steps_trained"], plan.group_steps)
        if result["stopped_early"]:
            out["stopped"] = f"time budget {params.time_budget} spent"
            return out
        if group.epoch_end:
            with dask.annotate(**placement):
                eval_loss = evaluate.submit(plan.run, out["ref"]).result()
            out["evals"].append((group.last_step, eval_loss))
            _say(f"epoch {group.epoch} ends at step {group.last_step}: eval loss {eval_loss:.4f}")
    return out


def _resume_point(plan: RunPlan, tally: RunTally) -> CheckpointRef | None:
    store = open_store(plan.run.store_url)
    corrupt: list[str] = []
    ref = store.latest_verified_ref(plan.run.run_id, on_corrupt=lambda err: corrupt.append(str(err)))
    for line in corrupt:
        _say(f"[yellow]corrupt checkpoint skipped: {line}")
    if ref is not None:
        meta = store.read_metadata(plan.run.run_id, ref.step)
        tally.resumed_from_step = ref.step
        tally.resumed_productive_s = float(meta.get("productive_s", 0.0))
        _say(f"resuming run {plan.run.run_id} from step {ref.step}, verified")
    return ref


@flow(name="rebound-train", log_prints=False)
def train(params: TrainParams) -> dict[str, Any]:
    """Train a model fault-tolerantly; returns the run summary (DESIGN.md section 4)."""
    started = time.time()
    plan = build_plan(params)
    exists = check_store(plan, params)
    store = open_store(params.store)
    if params.fresh and exists:
        store.delete_run(plan.run.run_id)
        _say(f"--fresh: run {plan.run.run_id} starts over")
    if params.fresh or not exists:
        store.write_json(plan.run.run_id, "run", run_record(plan, params))
    tally = RunTally(plan.run.run_id, params.store, started)
    ref = _resume_point(plan, tally)
    start_step = ref.step if ref is not None else 0
    use_gpu = params.device == "cuda" or (params.device == "auto" and cuda_available())
    deadline = started + params.time_budget_s if params.time_budget_s else None
    status, reason = "completed", None
    remaining = [g for g in plan.groups if g.last_step > start_step]
    with _cluster_address(params, use_gpu) as address:
        runner = DaskTaskRunner(address=address)
        for epoch in sorted({g.epoch for g in remaining}):
            groups = [g for g in remaining if g.epoch == epoch]
            out = train_epoch.with_options(
                task_runner=runner, flow_run_name=f"{plan.run.run_id} epoch {epoch}",
            )(plan, params, groups, ref.to_dict() if ref else None, use_gpu, deadline)
            ref = CheckpointRef.from_dict(out["ref"]) if out["ref"] else ref
            tally.checkpoints_committed += out["checkpoints"]
            tally.checkpoint_stall_s += out["stall_s"]
            tally.losses += out["losses"]
            tally.evals += out["evals"]
            if out["evals"]:
                tally.eval_loss = out["evals"][-1][1]
            if out["stopped"]:
                status, reason = "stopped", out["stopped"]
                break
    if status == "completed" and plan.stop_at < plan.total_steps:
        status, reason = "stopped", f"--until {plan.stop_at} reached"
    tally.failures = collect_failures(store, plan.run.run_id, since_unix=started)
    summary = build_summary(tally, status, reason, time.time() - started)
    create_markdown_artifact(summary_markdown(summary, tally), key="rebound-summary",
                             description=f"Rebound run {plan.run.run_id}")
    return summary


if __name__ == "__main__":
    import sys

    from flows.cli import main

    sys.exit(main(server_port=_SERVER_PORT))
