"""`python -m flows.train`: the Rebound training flow.

Reads top to bottom: plan the run, find the newest verified checkpoint, start (or join) the Dask
cluster, train epoch by epoch in supervised batch-group tasks, evaluate at epoch ends, report.
"""

from __future__ import annotations

if __name__ == "__main__":
    import os
    import sys
    import time

    from flows.kept_coordinator import handed_over

    _HANDOVER = handed_over()  # in a coordinator forked by the kept one: its imports are done
    _KEEP_COORDINATOR: str | None = None
    if _HANDOVER is None:
        _STARTED = time.time()  # the imports below are start-up too: seconds of it
        from flows.kept_coordinator import hand_over

        _KEEP_COORDINATOR = hand_over(_STARTED)  # exits here when a kept coordinator runs it
        # Prefect reads its settings from the environment when imported: set them first.
        from flows.prefect_env import prepare_environment

        _LOCAL_API = prepare_environment()
        _PREPARED_ENV = dict(os.environ)
    else:
        _STARTED, _LOCAL_API = _HANDOVER.started, _HANDOVER.local_api
        _PREPARED_ENV = {}
    from flows.cli import parse_params
    from flows.prefect_env import ServerInBackground
    from flows.worker_forkserver import start_worker_forkserver

    _PARAMS, _ = parse_params(None)  # --help and bad usage end here, before anything starts
    from flows.kept_cluster import claim_for_run

    # Workers kept from an earlier run need no forkserver; the first run's come up meanwhile.
    _KEPT_CLUSTER = claim_for_run(_PARAMS, _LOCAL_API)
    # Both take seconds of their own CPU: started now, they overlap the imports below.
    _SERVER = ServerInBackground(_LOCAL_API)
    _SERVER.__enter__()  # left in flows.cli.main, on every way out
    if _PARAMS.cluster is None and _KEPT_CLUSTER is None:  # else no worker to start here
        start_worker_forkserver()
        if _HANDOVER is not None:  # Dask read its configuration before that: again, then
            import dask.config

            dask.config.refresh()

import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from datetime import timedelta  # noqa: E402
from typing import Any  # noqa: E402

import dask  # noqa: E402
from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402
from rich.console import Console  # noqa: E402

import flows.flow_heartbeats  # noqa: E402,F401  (flow runs end when their work does)
from flows.cluster import (  # noqa: E402
    CLUSTER_LISTENERS,
    cluster_gone,
    cuda_available,
    give_up_on,
    local_cluster,
    running_workers,
)
from flows.failures import (  # noqa: E402
    Failure,
    collect_failures,
    committed_steps,
    run_attempts,
)
from flows.group_submit import mark_crashed, submit_supervised  # noqa: E402
from flows.lease_keeper import HeldLease, flow_lease  # noqa: E402
from flows.params import TrainParams  # noqa: E402
from flows.plan import (  # noqa: E402
    ConfigurationError,
    Group,
    RunPlan,
    build_plan,
    check_store,
    price_sample,
    run_record,
    young_daly_interval,
)
from flows.prefect_env import rebound_home  # noqa: E402
from flows.rank_group import DataParallelGroups, rendezvous_host  # noqa: E402
from flows.redundancy import Provisioner, local_cluster_size, redundancy_state  # noqa: E402
from flows.report import RunTally, build_summary, summary_markdown, wall_breakdown  # noqa: E402
from flows.spares import SpareWarmer  # noqa: E402
from flows.supervise import ClusterWatch, InfrastructureError  # noqa: E402
from flows.task_runner import ReboundTaskRunner  # noqa: E402
from flows.ui_artifacts import checkpoint_rows, dashboard_address  # noqa: E402
from storage import (  # noqa: E402
    CheckpointRef,
    CorruptCheckpointError,
    FatalStoreError,
    StoreError,
    open_store,
)
from tasks.chaos import parse_chaos  # noqa: E402
from tasks.evaluate import evaluate  # noqa: E402
from tasks.jobs import GroupJob  # noqa: E402
from tasks.train_batch_group import quiet_one_line_failures, train_batch_group  # noqa: E402
from tasks.train_rank import train_rank  # noqa: E402
from training.rendezvous import RendezvousServer  # noqa: E402

console = Console(stderr=True)

# The epoch subflow runs in this process; its cluster watcher and the run's tally are looked
# up here rather than passed as parameters (Prefect records parameters; a live client is no
# parameter, and the tally must outlive an epoch attempt that raises).
_LIVE: dict[str, tuple[ClusterWatch, RunTally, DataParallelGroups | None]] = {}


def _live(run_id: str) -> tuple[ClusterWatch, RunTally, DataParallelGroups | None]:
    # A function, not the dict itself, in the flow body: Prefect pickles the flow function by
    # value with the globals it names, and a live client cannot be pickled.
    return _LIVE[run_id]


def _uses_gpu(params: TrainParams) -> bool:
    return params.device == "cuda" or (params.device == "auto" and cuda_available())


@contextlib.contextmanager
def _cluster_address(params: TrainParams, use_gpu: bool) -> Iterator[str]:
    if params.cluster:
        yield params.cluster
        return
    with local_cluster(local_cluster_size(params), rebound_home() / "dask", use_gpu,
                       boot_low=params.standby == "hot") as cluster:
        yield cluster.scheduler_address


def _say(message: str, style: str | None = None) -> None:
    """One line to the Prefect log and to the terminal (never wrapped: scripts grep it)."""
    get_run_logger().info(message)
    console.print(message, style=style, soft_wrap=True, markup=False, highlight=False)


def _placement(use_gpu: bool, warm_worker: str | None,
               watch: ClusterWatch) -> contextlib.AbstractContextManager:
    """Dask annotations for the next task: the warm worker (whose memory holds the run's state)
    only as a preference the scheduler can drop at once.

    Dask keeps a task restricted to a worker that is gone in 'no-worker' when no other worker
    is running at that moment, even with allow_other_workers, and never gives it to a worker
    that joins later (distributed#7346, #8600): it would wait for the stranded-task watcher.
    So the warm worker is named only while it is running and another running worker can take
    over; otherwise nothing is pinned, and whichever worker runs the group loads the newest
    verified checkpoint from the store.
    """
    placement: dict[str, Any] = {"resources": {"GPU": 1}} if use_gpu else {}
    if warm_worker:
        running = running_workers(watch)
        if warm_worker in running and len(running) > 1:
            placement.update(workers=[warm_worker], allow_other_workers=True)
    return dask.annotate(**placement)


@flow(name="rebound-epoch", log_prints=False, retries=1, validate_parameters=False)
def train_epoch(plan: RunPlan, params: TrainParams, groups: list[Group], start_ref: dict | None,
                use_gpu: bool, deadline_unix: float | None) -> dict[str, Any]:
    """Train one epoch's batch groups in order and evaluate at its end; retried as a whole.

    A retry re-submits every group, and each group whose checkpoint is already committed
    returns it at once, so an epoch retry only trains what was lost. What the groups did is
    folded into the run's tally as each one returns, so a failed attempt's checkpoints,
    losses and failures stay counted. A lost cluster or a storage that refuses (full disk)
    is not retried here: it comes back as `infra_error` / `fatal` for the run to fail on.
    """
    out: dict[str, Any] = {"ref": start_ref, "stopped": None, "infra_error": None, "fatal": None}
    watch, tally, ranks = _live(plan.run.run_id)
    dog = params.watchdog
    last_worker: str | None = None
    protect = tuple(sorted({g.last_step for g in plan.groups if g.epoch_end}))
    interval_set = plan.ckpt_auto or params.ckpt_every is not None
    task = train_batch_group.with_options(retries=params.retries)

    def on_infra(kind: str, reason: str) -> None:
        tally.infra_failures.append({"unix": time.time(), "kind": kind, "reason": reason})
        _say(f"{kind}: {reason}; resubmitting", "yellow")

    def run_group(group: Group) -> dict[str, Any]:
        nonlocal last_worker
        # An epoch's end is evaluated from the store, and the run's last group ends the run:
        # their checkpoints commit before the group returns; others may land in the background.
        # So does a group's end while --ckpt-every auto has no price yet: a group whose only
        # save is its last runs no step beside it, so only an in-line save prices it, and the
        # next group then starts at a measured interval instead of one per group.
        commit_end = (not plan.run.async_save or group.epoch_end or group.last_step >= plan.stop_at
                      or (plan.ckpt_auto and tally.ckpt_auto is None))
        # With an interval set, a group's end is a checkpoint only where one is needed: one
        # worker goes on from its memory, so an end off the interval would be a save (and a wait
        # before the next group) that protects nothing the interval does not. A time budget
        # may stop the run between two groups: then the last one's end must be there.
        save_end = commit_end or ranks is not None or not interval_set or deadline_unix is not None
        job = GroupJob(plan.run, group.first_step, group.last_step, plan.ckpt_every,
                       protect, deadline_unix, commit_end, save_end)
        if ranks is not None:
            result = _run_ranked(ranks, job, use_gpu, tally)
        else:
            result = submit_supervised(
                lambda job=job: task.submit(job),
                lambda pinned, w=last_worker: _placement(use_gpu, w if pinned else None, watch),
                watch, dog, f"steps {group.first_step}-{group.last_step}", params.retries,
                on_infra)
        out["ref"], last_worker = result["ref"] or out["ref"], result.get("worker")
        tally.absorb_group(result)
        for line in result["corrupt"]:
            _say(f"corrupt checkpoint skipped: {line}", "yellow")
        sample = price_sample(result) if plan.ckpt_auto and result["steps_trained"] else None
        if sample is not None:
            # With --async-save the price of one more checkpoint is a background save's stall
            # plus how much it slowed the steps it overlapped (on a machine whose cores all
            # train, its hashing and writing take theirs); the saves that must commit in line
            # (epoch ends) happen whatever the interval.
            stall_s, drag_s = tally.checkpoint_price.add(sample)
            step_s = result["train_s"] / result["steps_trained"]
            chosen = young_daly_interval(stall_s + drag_s, params.mtbf_s, step_s, plan.group_steps)
            if chosen != plan.ckpt_every or tally.ckpt_auto is None:
                _say(f"--ckpt-every auto: every {chosen} steps (stall {stall_s * 1000:.1f} ms "
                     f"+ {drag_s * 1000:.0f} ms slower steps per checkpoint, {step_s * 1000:.0f} ms "
                     f"per step, MTBF {params.mtbf_s:.0f} s)")
            plan.ckpt_every = chosen
            tally.ckpt_auto = {"every": chosen, "stall_per_checkpoint_s": stall_s,
                               "drag_per_checkpoint_s": drag_s, "step_s": step_s,
                               "mtbf_s": params.mtbf_s, "after_step": result["step"]}
        return result

    def evaluate_epoch_end(group: Group) -> float:
        """Evaluate the epoch's last checkpoint; a corrupt one is trained again, once, as a
        group's start would fall back (a retry of the evaluation would read the same bytes)."""
        for again in (False, True):
            ref, started = out["ref"], time.time()
            try:
                return submit_supervised(
                    lambda ref=ref: evaluate.submit(plan.run, ref),
                    lambda pinned, w=last_worker: _placement(use_gpu, w if pinned else None, watch),
                    watch, dog, f"evaluation at step {group.last_step}", params.retries,
                    on_infra)
            except CorruptCheckpointError as err:
                tally.corrupt_found.append(err.to_dict() | {"found_unix": time.time()})
                if again:
                    raise
                _say(f"corrupt checkpoint at the epoch's end, training it again: {err}", "yellow")
            finally:
                tally.eval_windows.append((started, time.time()))
            run_group(group)
        raise AssertionError("unreachable")

    try:
        for group in groups:
            if deadline_unix is not None and time.time() >= deadline_unix:
                out["stopped"] = f"time budget {params.time_budget} spent"
                return out
            result = run_group(group)
            if result["stopped_early"]:
                out["stopped"] = f"time budget {params.time_budget} spent"
                return out
            if group.epoch_end:
                eval_loss = evaluate_epoch_end(group)
                tally.absorb_eval(group.last_step, eval_loss)
                _say(f"epoch {group.epoch} ends at step {group.last_step}: "
                     f"eval loss {eval_loss:.4f}")
    except InfrastructureError as err:
        out["infra_error"] = str(err)
    except FatalStoreError as err:
        # No retry can help (full disk, read-only, no permission): the run fails now.
        tally.errors.append({"kind": "storage", "unix": time.time(), "reason": str(err)})
        out["fatal"] = str(err)
    except Exception as err:
        # The epoch is retried (Prefect `retries`): the failure is one in the run's timeline.
        tally.errors.append({"kind": "task-error", "unix": time.time(),
                             "reason": f"{type(err).__name__}: {_first_line(err)}"})
        raise
    return out


def _run_ranked(ranks: DataParallelGroups, job: GroupJob, use_gpu: bool,
                tally: RunTally) -> dict[str, Any]:
    """One batch group on every rank (flows/rank_group.py), in the shape of a group's result."""

    def submit(rank_job: Any, worker: str) -> Any:
        # Ranks need distinct workers: each is pinned to its own, and the group is re-formed
        # (not left waiting) when that worker goes.
        placement: dict[str, Any] = {"workers": [worker], "allow_other_workers": False}
        if use_gpu:
            placement["resources"] = {"GPU": 1}
        with dask.annotate(**placement):
            return train_rank.submit(rank_job)

    result = ranks.run(job, submit, mark_crashed)
    # Corrupt checkpoints passed over are in rank 0's attempt record: the timeline reads them.
    result["corrupt"] = [f"run {c['run_id']!r} step {c['step']} array {c.get('array')!r} "
                         f"chunk {c.get('chunk')!r}: {c.get('reason')}" for c in result["corrupt"]]
    tally.ranks = result["ranks"]
    return result


def _first_line(err: BaseException) -> str:
    return str(err).splitlines()[0] if str(err) else ""


def _resume_point(plan: RunPlan, tally: RunTally) -> CheckpointRef | None:
    """The newest committed checkpoint whose manifest and files check out, without reading
    its chunks: the task that loads it hashes every byte anyway (and falls back past a
    corrupt one, reporting it), so resume reads each chunk once."""
    store = open_store(plan.run.store_url)
    corrupt: list[CorruptCheckpointError] = []
    ref = store.latest_committed_ref(plan.run.run_id, on_corrupt=corrupt.append)
    for err in corrupt:
        _say(f"corrupt checkpoint skipped: {err}", "yellow")
        tally.corrupt_found.append(err.to_dict() | {"found_unix": time.time(),
                                                    "fell_back_to": ref.step if ref else None})
    if ref is not None:
        meta = store.read_metadata(plan.run.run_id, ref.step)
        tally.resumed_from_step = ref.step
        tally.resumed_productive_s = float(meta.get("productive_s", 0.0))
        # "verified": every check but the chunk hashes here, those as the task loads it.
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
    elif params.reshard:
        before = store.read_json(plan.run.run_id, "run")
        if int(before.get("workers", 1)) != params.workers:
            # From now on the run is an N-rank run: a plain resume with N is bit-exact again.
            record = run_record(plan, params) | {"resharded_from_workers": before.get("workers", 1)}
            store.write_json(plan.run.run_id, "run", record)
            _say(f"--reshard: run {plan.run.run_id} continues on {params.workers} workers "
                 f"(was {before.get('workers', 1)}); not bit-exact with either")


def _train_epochs(plan: RunPlan, params: TrainParams, tally: RunTally, started: float,
                  ref: CheckpointRef | None) -> tuple[str, str | None]:
    """Run the epochs on the cluster; returns (status, reason)."""
    start_step = ref.step if ref is not None else 0
    use_gpu = _uses_gpu(params)
    deadline = started + params.time_budget_s if params.time_budget_s else None
    remaining = [g for g in plan.groups if g.last_step > start_step]
    with _cluster_address(params, use_gpu) as address:
        watch = ClusterWatch(address, plan.run.run_id, params.watchdog.scheduler_timeout)
        _say(f"Dask dashboard: {dashboard_address(watch.client)}")
        # Redundancy: quarantined (and, cold, lost) workers are replaced; the cluster keeps its size.
        watch.keep_size(Provisioner.for_run(watch, params), params.max_failures_per_worker)
        server = ranks = None
        if params.workers > 1 or params.replicas > 1:
            # The rendezvous lives here, in the coordinator: it outlives any rank.
            server = RendezvousServer(rendezvous_host(address))
            chaos = parse_chaos(params.chaos)
            seed = int(plan.run.train_config.get("seed", 0))

            def chaos_for_rank(replica: int, rank: int, first: int,
                               last: int) -> tuple[tuple[str, int], ...]:
                events = chaos.for_rank(rank, replica)
                if rank == 0 and replica == 0:
                    events += chaos.random_events(seed, first, last)
                return tuple((e.kind, e.step) for e in events)

            ranks = DataParallelGroups(
                watch, server, plan.run.run_id, params.workers,
                timedelta(seconds=params.collective_timeout_s), params.watchdog, params.retries,
                chaos_for_rank, lambda line: _say(line, "yellow"), replicas=params.replicas,
                policy=params.replica_policy, vote_every=params.vote_every)
        _LIVE[plan.run.run_id] = (watch, tally, ranks)
        runner = ReboundTaskRunner(address=address, client_kwargs={
            "timeout": params.watchdog.scheduler_timeout.total_seconds()})
        # Hot spares: idle workers read the corpus and build the trainer before they are needed.
        warmer = SpareWarmer(watch.client, plan.run).__enter__()
        try:
            for epoch in sorted({g.epoch for g in remaining}):
                groups = [g for g in remaining if g.epoch == epoch]
                try:
                    out = train_epoch.with_options(
                        task_runner=runner, flow_run_name=f"{plan.run.run_id} epoch {epoch}",
                    )(plan, params, groups, ref.to_dict() if ref else None, use_gpu, deadline)
                except Exception as err:
                    if watch.scheduler_reachable():
                        # Failed past the group's retries and the epoch's retry.
                        return "failed", f"{type(err).__name__}: {_first_line(err)}"
                    # An epoch that could not even start its task runner: a lost cluster.
                    reason = (f"Dask scheduler {address} unreachable (cluster lost): "
                              f"{type(err).__name__}: {_first_line(err)}")
                    tally.errors.append({"kind": "cluster-lost", "unix": time.time(),
                                         "reason": reason})
                    return "failed", reason
                ref = CheckpointRef.from_dict(out["ref"]) if out["ref"] else ref
                if tally.evals and any(g.last_step == tally.evals[-1][0] for g in groups):
                    # Said in the epoch's subflow too; the run's own log carries it for the UI.
                    get_run_logger().info(f"epoch {epoch} ends at step {tally.evals[-1][0]}: "
                                          f"eval loss {tally.evals[-1][1]:.4f}")
                if out["fatal"]:
                    return "failed", out["fatal"]
                if out["infra_error"]:
                    lost_all = any(w in out["infra_error"]
                               for w in ("unreachable", "every Dask", "cluster lost"))
                    tally.errors.append({"kind": "cluster-lost" if lost_all else "worker-lost",
                                         "unix": time.time(), "reason": out["infra_error"]})
                    return "failed", out["infra_error"]
                if out["stopped"]:
                    return "stopped", out["stopped"]
        finally:
            if cluster_gone(address) or not watch.answering():
                watch.abandon()  # else every call below waits out the client's reconnect
            warmer.__exit__(None, None, None)
            _LIVE.pop(plan.run.run_id, None)
            handled = set()
            if ranks is not None:
                # The group's own account of its failures replaces the raw scheduler events.
                tally.rank_failures = list(ranks.failures)
                tally.spare_workers = ranks.spares()
                handled = {f.worker for f in ranks.failures} | ranks.out_of_service
                ranks.release()
                server.close()
            tally.worker_losses = [vars(loss) for loss in watch.losses
                                   if loss.worker not in handled]
            tally.hangs = list(watch.hangs)
            tally.attempt_totals = {k: (v.trained_s, v.stall_s) for k, v in watch.attempts.items()}
            tally.redundancy = redundancy_state(watch, ranks, tally.last_worker)
            if tally.redundancy is not None:
                tally.redundancy["warmed"] = warmer.state()
            watch.close()
    if plan.stop_at < plan.total_steps:
        return "stopped", f"--until {plan.stop_at} reached"
    return "completed", None


def _gone_for_good(address: str, reason: str | None) -> str | None:
    """cluster_gone; and a kept cluster whose scheduler answered nothing for --cluster-timeout
    (its server lives, wedged) is put down by its PID, so it is gone too."""
    if gone := cluster_gone(address):
        return gone
    if reason and "unreachable for" in reason:
        return give_up_on(address, "answered nothing for --cluster-timeout and is put down")
    return None


def _train_epochs_healing(plan: RunPlan, params: TrainParams, tally: RunTally, started: float,
                          ref: CheckpointRef | None) -> tuple[str, str | None]:
    """_train_epochs; when the Dask cluster kept between runs dies under it (its server's
    process is gone: nothing brings it back), the run goes on from its newest checkpoint on a
    cluster of its own, in this flow: one summary, one wall clock, the loss among its failures."""
    address = params.cluster
    errors_before = len(tally.errors)
    try:
        status, reason = _train_epochs(plan, params, tally, started, ref)
    except InfrastructureError as err:
        if address is None or not _gone_for_good(address, str(err)):
            raise
        status, reason = "failed", str(err)
    gone = _gone_for_good(address, reason) if address is not None and status == "failed" else None
    if not gone:
        return status, reason
    if not any(e["kind"] == "cluster-lost" for e in tally.errors[errors_before:]):
        tally.errors.append({"kind": "cluster-lost", "unix": time.time(), "reason": gone})
    first = (tally.rank_failures, tally.worker_losses, tally.hangs, tally.attempt_totals)
    _say(f"{gone}: the run goes on from its newest checkpoint on a cluster of its own",
         "yellow")
    ref = open_store(params.store).latest_committed_ref(plan.run.run_id)
    own = params.model_copy(update={"cluster": None})
    with _cluster_address(own, _uses_gpu(params)) as address:
        for listener in CLUSTER_LISTENERS:
            listener(address)
        status, reason = _train_epochs(plan, own.model_copy(update={"cluster": address}), tally,
                                       started, ref)
    tally.rank_failures = first[0] + tally.rank_failures
    tally.worker_losses = first[1] + tally.worker_losses
    tally.hangs = first[2] + tally.hangs
    tally.attempt_totals = first[3] | tally.attempt_totals
    return status, reason


def _tell_the_truth(tally: RunTally, started: float, ended: float) -> Callable[[float], dict]:
    """Rebuild from the store what this invocation did (it survives any failure); returns the
    wall-time breakdown, given the seconds of training that survive into the final model."""
    store = open_store(tally.store_url)
    try:
        attempts = run_attempts(store, tally.run_id, started)
    except StoreError:
        attempts = []
    if attempts and attempts[0].get("resumed_from_step") is not None and \
            tally.resumed_from_step is not None and \
            attempts[0]["resumed_from_step"] < tally.resumed_from_step:
        # The checkpoint the flow chose did not verify when loaded: the run resumed earlier.
        tally.resumed_from_step = attempts[0]["resumed_from_step"]
        tally.resumed_productive_s = float(attempts[0].get("resumed_productive_s", 0.0))
    tally.checkpoints_committed = len(committed_steps(store, tally.run_id, started, attempts))
    failures = collect_failures(store, tally.run_id, started, tally, attempts)
    failures = sorted(failures + [Failure(f.entry(), f.failed_unix, f.recovered_unix)
                                  for f in tally.rank_failures], key=lambda f: f.failed_unix)
    tally.failures = [f.entry for f in failures]
    # Per attempt: the task's own totals when its result came back, else its progress events.
    totals = dict(tally.attempt_totals) | tally.group_totals
    trained_s = sum(t for t, _ in totals.values())
    tally.checkpoint_stall_s = sum(c for _, c in totals.values())
    # A rot injected after a commit costs nothing until it is found: its "corrupt-checkpoint"
    # finding (and the retraining) is where the time goes.
    recovery = [(f.failed_unix, f.ready_unix or ended) for f in failures
                if f.entry["kind"] != "corrupt-latest"]
    first_ready = min((a["ready_unix"] for a in attempts), default=None)
    return lambda productive_s: wall_breakdown(
        (started, ended), first_ready, productive_s, trained_s, tally.checkpoint_stall_s,
        tally.eval_windows, recovery)


@flow(name="rebound-train", log_prints=False)
def train(params: TrainParams) -> dict[str, Any]:
    """Train a model fault-tolerantly; returns the run summary (DESIGN.md section 4).

    Raises:
        RunFailed: the run failed; it carries the summary, true on this path too.
        LeaseHeld: another coordinator holds the run (flows/lease_keeper.py).
    """
    started = time.time()
    plan = build_plan(params)
    # One coordinator at a time (DESIGN.md section 8): the CLI's lease, or one taken here.
    with flow_lease(params.store, plan.run.run_id, timedelta(seconds=params.lease_ttl_s)) as held:
        # Every commit of this run carries the lease's epoch: a stale one is refused.
        plan.run = dataclasses.replace(plan.run, lease_epoch=held.epoch)
        return _train_holding(params, plan, started, held)


def _train_holding(params: TrainParams, plan: RunPlan, started: float,
                   held: HeldLease) -> dict[str, Any]:
    """The body of `train`, under the run's lease."""
    tally = RunTally(plan.run.run_id, params.store, started)
    try:
        if lost := held.lost():
            raise lost  # lost while the cluster started: fail before writing anything
        _prepare_store(plan, params)
        ref = _resume_point(plan, tally)
        status, reason = _train_epochs_healing(plan, params, tally, started, ref)
    except ConfigurationError:
        raise
    except (FatalStoreError, InfrastructureError) as err:
        tally.errors.append({"kind": "storage" if isinstance(err, FatalStoreError) else
                             "cluster-lost", "unix": time.time(), "reason": str(err)})
        status, reason = "failed", str(err)
    except Exception as err:  # noqa: BLE001 - every failure still ends with a true summary
        status, reason = "failed", f"{type(err).__name__}: {_first_line(err)}"
    if status == "failed" and (lost := held.lost()):
        # A refused commit says so itself; whatever else failed, the lost lease is named too.
        if "lease lost" not in (reason or ""):
            reason = f"{reason}; {lost}" if reason else str(lost)
        for error in tally.errors:
            if error["reason"].startswith("lease lost"):
                error["kind"] = "lease-lost"
    ended = time.time()
    breakdown = _tell_the_truth(tally, started, ended)
    summary = build_summary(tally, status, reason, ended - started)
    summary.update(workers=params.workers, replicas=params.replicas,
                   spares=params.spares if params.standby == "hot" else 0,
                   async_save=plan.run.async_save)
    if params.reshard:
        summary["resharded"] = ("continued on --workers "
                                f"{params.workers} from another N: not bit-exact")
    if tally.ranks:
        summary["ranks"] = tally.ranks
    if params.replicas > 1:
        summary["replication"] = {
            "replicas": params.replicas, "policy": params.replica_policy,
            "vote_every": params.vote_every, "votes": tally.votes,
            "vote_s": round(tally.vote_s, 4), "vote_wait_s": round(tally.vote_wait_s, 4),
            "steps_trained": tally.steps_trained}
    summary["wall_breakdown"] = {k: round(v, 3) for k, v in
                                 breakdown(summary["productive_s"]).items()}
    # The store's newest checkpoints, each read back in full: the UI says which ones verify.
    checkpoints = checkpoint_rows(params.store, plan.run.run_id, started)
    create_markdown_artifact(summary_markdown(summary, tally, checkpoints), key="rebound-summary",
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


# The run's own failure is one line, said by the CLI: Prefect logs it without a traceback.
quiet_one_line_failures(RunFailed, InfrastructureError)

if __name__ == "__main__":
    from flows.cli import main

    _STATUS = main(local_api=_LOCAL_API, started=_STARTED, server=_SERVER,
                   kept_cluster=_KEPT_CLUSTER)
    if _STATUS in (0, 1):  # a run happened: the next one may skip these imports
        from flows.kept_coordinator import describe, keep

        _KEPT_PID = keep(_KEEP_COORDINATOR, _PREPARED_ENV)
        if _KEPT_PID is not None:
            console.print(describe(_KEPT_PID), soft_wrap=True, markup=False,
                          highlight=False)
    sys.exit(_STATUS)
