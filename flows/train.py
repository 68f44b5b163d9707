"""`python -m flows.train`: the Rebound training flow.

Reads top to bottom: plan the run, find the newest verified checkpoint, start (or join) the Dask
cluster, train epoch by epoch in supervised batch-group tasks, evaluate at epoch ends, report.
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
from flows.group_submit import submit_supervised  # noqa: E402
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
from flows.supervise import ClusterWatch, InfrastructureError  # noqa: E402
from storage import CheckpointRef, open_store  # noqa: E402
from tasks.evaluate import evaluate  # noqa: E402
from tasks.jobs import GroupJob  # noqa: E402
from tasks.train_batch_group import train_batch_group  # noqa: E402

console = Console(stderr=True)

# The epoch subflow runs in this process; its cluster watcher is looked up here rather than
# passed as a parameter (Prefect records parameters; a live client is no parameter).
_WATCHES: dict[str, ClusterWatch] = {}


def _watch_of(run_id: str) -> ClusterWatch:
    # A function, not the dict itself, in the flow body: Prefect pickles the flow function by
    # value with the globals it names, and a live client cannot be pickled.
    return _WATCHES[run_id]


@contextlib.contextmanager
def _cluster_address(params: TrainParams, use_gpu: bool) -> Iterator[str]:
    if params.cluster:
        yield params.cluster
        return
    n = params.workers + params.spares if params.standby == "hot" else params.workers
    with local_cluster(n, rebound_home() / "dask", use_gpu) as cluster:
        yield cluster.scheduler_address


def _say(message: str, style: str | None = None) -> None:
    """One line to the Prefect log and to the terminal (never wrapped: scripts grep it)."""
    get_run_logger().info(message)
    console.print(message, style=style, soft_wrap=True, markup=False, highlight=False)


def _placement(use_gpu: bool, worker: str | None) -> dict[str, Any]:
    placement: dict[str, Any] = {"resources": {"GPU": 1}} if use_gpu else {}
    if worker:
        # Keep the run on the worker whose memory already holds its state (warm cache);
        # any other worker may take it when that one is gone.
        placement.update(workers=[worker], allow_other_workers=True)
    return placement


@flow(name="rebound-epoch", log_prints=False, retries=1, validate_parameters=False)
def train_epoch(plan: RunPlan, params: TrainParams, groups: list[Group], start_ref: dict | None,
                use_gpu: bool, deadline_unix: float | None) -> dict[str, Any]:
    """Train one epoch's batch groups in order and evaluate at its end; retried as a whole.

    A retry re-submits every group, and each group whose checkpoint is already committed
    returns it at once, so an epoch retry only trains what was lost. A lost cluster is not
    retried here: it comes back as `infra_error` for the run to fail on.
    """
    out: dict[str, Any] = {"ref": start_ref, "stopped": None, "infra_error": None,
                           "checkpoints": 0, "stall_s": 0.0, "losses": [], "evals": [],
                           "infra_failures": [], "throughput": []}
    watch = _watch_of(plan.run.run_id)
    dog = params.watchdog
    last_worker: str | None = None
    protect = tuple(sorted({g.last_step for g in plan.groups if g.epoch_end}))
    task = train_batch_group.with_options(retries=params.retries)

    def on_infra(kind: str, reason: str) -> None:
        out["infra_failures"].append({"unix": time.time(), "kind": kind, "reason": reason})
        _say(f"{kind}: {reason}; resubmitting", "yellow")

    try:
        for group in groups:
            if deadline_unix is not None and time.time() >= deadline_unix:
                out["stopped"] = f"time budget {params.time_budget} spent"
                return out
            job = GroupJob(plan.run, group.first_step, group.last_step, plan.ckpt_every,
                           protect, deadline_unix)
            result = submit_supervised(
                lambda job=job: task.submit(job),
                lambda pinned, w=last_worker: dask.annotate(**_placement(use_gpu, w if pinned else None)),
                watch, dog, f"steps {group.first_step}-{group.last_step}", params.retries,
                on_infra)
            out["ref"], last_worker = result["ref"], result.get("worker")
            out["checkpoints"] += len(result["checkpoints"])
            out["stall_s"] += result["ckpt_s"]
            out["losses"] += [tuple(x) for x in result["losses"]]
            if result["train_s"] > 0:
                out["throughput"].append((result["step"], result["tokens"] / result["train_s"]))
            for line in result["corrupt"]:
                _say(f"corrupt checkpoint skipped: {line}", "yellow")
            if plan.ckpt_auto and result["steps_trained"] and result["checkpoints"]:
                plan.ckpt_every = young_daly_interval(
                    result["ckpt_s"] / len(result["checkpoints"]), params.mtbf_s,
                    result["train_s"] / result["steps_trained"], plan.group_steps)
            if result["stopped_early"]:
                out["stopped"] = f"time budget {params.time_budget} spent"
                return out
            if group.epoch_end:
                ref = out["ref"]
                eval_loss = submit_supervised(
                    lambda ref=ref: evaluate.submit(plan.run, ref),
                    lambda pinned, w=last_worker: dask.annotate(**_placement(use_gpu, w if pinned else None)),
                    watch, dog, f"evaluation at step {group.last_step}", params.retries,
                    on_infra)
                out["evals"].append((group.last_step, eval_loss))
                _say(f"epoch {group.epoch} ends at step {group.last_step}: "
                     f"eval loss {eval_loss:.4f}")
    except InfrastructureError as err:
        out["infra_error"] = str(err)
    return out


def _resume_point(plan: RunPlan, tally: RunTally) -> CheckpointRef | None:
    store = open_store(plan.run.store_url)
    corrupt: list[str] = []
    ref = store.latest_verified_ref(plan.run.run_id, on_corrupt=lambda err: corrupt.append(str(err)))
    for line in corrupt:
        _say(f"corrupt checkpoint skipped: {line}", "yellow")
    tally.corrupt_on_resume = corrupt
    if ref is not None:
        meta = store.read_metadata(plan.run.run_id, ref.step)
        tally.resumed_from_step = ref.step
        tally.resumed_productive_s = float(meta.get("productive_s", 0.0))
        _say(f"resuming run {plan.run.run_id} from step {ref.step}, verified")
    return ref


def _prepare_store(plan: RunPlan, params: TrainParams) -> None:
    exists = check_store(plan, params)
    store = open_store(params.store)
    if params.fresh and exists:
        store.delete_run(plan.run.run_id)
        _say(f"--fresh: run {plan.run.run_id} starts over")
    if params.fresh or not exists:
        store.write_json(plan.run.run_id, "run", run_record(plan, params))


@flow(name="rebound-train", log_prints=False)
def train(params: TrainParams) -> dict[str, Any]:
    """Train a model fault-tolerantly; returns the run summary (DESIGN.md section 4)."""
    started = time.time()
    plan = build_plan(params)
    _prepare_store(plan, params)
    tally = RunTally(plan.run.run_id, params.store, started)
    ref = _resume_point(plan, tally)
    start_step = ref.step if ref is not None else 0
    use_gpu = params.device == "cuda" or (params.device == "auto" and cuda_available())
    deadline = started + params.time_budget_s if params.time_budget_s else None
    status, reason = "completed", None
    remaining = [g for g in plan.groups if g.last_step > start_step]
    with _cluster_address(params, use_gpu) as address:
        watch = ClusterWatch(address, plan.run.run_id, params.watchdog.scheduler_timeout)
        _WATCHES[plan.run.run_id] = watch
        runner = DaskTaskRunner(address=address, client_kwargs={
            "timeout": params.watchdog.scheduler_timeout.total_seconds()})
        try:
            for epoch in sorted({g.epoch for g in remaining}):
                groups = [g for g in remaining if g.epoch == epoch]
                try:
                    out = train_epoch.with_options(
                        task_runner=runner, flow_run_name=f"{plan.run.run_id} epoch {epoch}",
                    )(plan, params, groups, ref.to_dict() if ref else None, use_gpu, deadline)
                except Exception as err:
                    # An epoch that could not even start its task runner: a lost cluster?
                    if watch.scheduler_reachable():
                        raise
                    status, reason = "failed", (
                        f"Dask scheduler {address} unreachable (cluster lost): "
                        f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
                    break
                ref = CheckpointRef.from_dict(out["ref"]) if out["ref"] else ref
                tally.absorb_epoch(out)
                if out["infra_error"]:
                    status, reason = "failed", out["infra_error"]
                    break
                if out["stopped"]:
                    status, reason = "stopped", out["stopped"]
                    break
        finally:
            _WATCHES.pop(plan.run.run_id, None)
            tally.worker_losses = [vars(loss) for loss in watch.losses]
            tally.hangs = list(watch.hangs)
            watch.close()
    if status == "completed" and plan.stop_at < plan.total_steps:
        status, reason = "stopped", f"--until {plan.stop_at} reached"
    store = open_store(params.store)
    tally.failures = collect_failures(store, plan.run.run_id, started, tally)
    summary = build_summary(tally, status, reason, time.time() - started)
    create_markdown_artifact(summary_markdown(summary, tally), key="rebound-summary",
                             description=f"Rebound run {plan.run.run_id}")
    if status == "failed":
        # Raise so Prefect shows the run Failed; the summary travels with the exception.
        raise RunFailed(reason or "failed", summary)
    return summary


class RunFailed(RuntimeError):
    """The run failed after its retries; carries the summary that was still computed."""

    def __init__(self, reason: str, summary: dict[str, Any]) -> None:
        super().__init__(reason)
        self.summary = summary


if __name__ == "__main__":
    import sys

    from flows.cli import main

    sys.exit(main(server_port=_SERVER_PORT))
