"""One rank of a data-parallel batch group: join the group, agree on the state to start from
(a live peer's memory first, the store second), train in lockstep, vote, write a share of each
checkpoint, and hand back a reference.

A lost peer shows up here as a CollectiveError inside a step's all_reduce, before the optimizer
ran: this rank's state is still exactly the last completed step, so it keeps it warm and raises
PeerLost; the flow re-forms the group and the next attempt copies that state to the newcomer
instead of going back to the last checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

from storage import (
    CheckpointRef,
    CorruptCheckpointError,
    ShareReceipt,
    TransientStoreError,
    open_store,
)
from storage.faults import ENV as STORAGE_FAULT_ENV
from storage.hashing import state_hash
from storage.store import CheckpointStore, SaveStats
from tasks import chaos, health, progress
from tasks.background_saves import StepDrag
from tasks.chaos import ChaosEvent
from tasks.jobs import GroupJob, RunSpec
from tasks.rank_cache import leave_group, rank_group_for
from tasks.rank_jobs import PeerLost, RankJob, RanksDisagree
from tasks.rank_saves import RankSaves
from tasks.replica_board import ReplicasDisagree, announce_commit, await_commit, vote, writer
from tasks.worker_cache import WarmTrainer, drop_warm, put_warm, take_spare, take_warm
from training.config import TrainConfig
from training.device import resolve_device
from training.distributed import CollectiveError, RankGroup, Rendezvous, batch_share
from training.loop import Trainer

SAVE_RETRY_DELAYS_S = (0.5, 1.0, 2.0)
HANG_DURATION = timedelta(hours=1)


@dataclass
class RankResult:
    """What a rank hands back (rank 0's ref and losses speak for the group)."""

    rank: int
    worker: str | None
    replica: int = 0
    ref: dict[str, Any] = field(default_factory=dict)
    step: int = 0
    reused: bool = False
    restored_from: str | None = None
    """'warm' (every rank already held it), 'peer' (copied from a live rank), 'checkpoint'
    (read from the store) or None (fresh start)."""
    start_step: int = 0
    """Step this attempt started training from."""
    checkpoint_loads: int = 0
    """Checkpoints this rank read from the store (0 for a peer restore)."""
    peer_restore_s: float = 0.0
    steps_trained: int = 0
    tokens: int = 0
    train_s: float = 0.0
    ckpt_s: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)
    checkpoints: list[int] = field(default_factory=list)
    bytes_written: int = 0
    bytes_reused: int = 0
    corrupt: list[dict[str, Any]] = field(default_factory=list)
    state_hash: str = ""
    train_loss: float | None = None
    first_step_unix: float | None = None
    cpu_s: float = 0.0
    """CPU seconds this rank's process spent on the group (training, collectives, saves)."""
    window_unix: tuple[float, float] = (0.0, 0.0)
    """When this rank trained the group (start, end)."""
    pid: int = field(default_factory=os.getpid)
    attempt: str | None = None
    """Rank 0: name of this attempt's record in the store (`attempts/...`)."""
    vote_s: float = 0.0
    """Seconds spent hashing and comparing state with the other replicas."""
    votes: int = 0
    vote_wait_s: float = 0.0
    """Of vote_s, the seconds spent waiting for the other replicas' hashes."""
    pending_votes: list[int] = field(default_factory=list)
    """Vote steps whose ballots were not complete yet (compared at a later vote)."""
    background_saves: int = 0
    """Checkpoints inside the group whose share this rank wrote in the background."""
    background_stall_s: float = 0.0
    """Of ckpt_s, what those saves stopped training for (hash agreement, snapshot, waiting for
    the save before)."""
    background_drag_s: float = 0.0
    """How much longer the steps that overlapped a background save took (StepDrag)."""
    background_overlap_steps: int = 0
    """How many steps background_drag_s was measured over (0: not measured yet)."""
    newest_committed_at_start: int = -1
    """The newest committed step when this attempt started, as every rank agreed on it."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _build_trainer(run: RunSpec, group: RankGroup) -> Trainer:
    from tasks.worker_cache import corpus_for

    spare = take_spare((run.run_id, run.config_hash))  # built while this worker stood by
    if spare is not None:
        batch_share(spare.cfg.batch_size, group.world_size)
        spare.sync = group
        return spare
    cfg = TrainConfig(**run.train_config).resolved()
    return Trainer(cfg, corpus_for(run.data_path), device=run.device, sync=group)


def _hash_of(trainer: Trainer) -> str:
    return state_hash(trainer.capture()[0])


def _committed_end(store: CheckpointStore, job: GroupJob) -> CheckpointRef | None:
    if job.last_step not in store.steps(job.run.run_id):
        return None
    return store.ref(job.run.run_id, job.last_step) if store.verify(
        job.run.run_id, job.last_step).ok else None


def _load_newest(store: CheckpointStore, job: GroupJob, trainer: Trainer,
                 result: RankResult) -> CheckpointRef | None:
    """Restore the newest checkpoint <= last_step that verifies; None: start fresh."""
    run = job.run
    for step in sorted((s for s in store.steps(run.run_id) if s <= job.last_step), reverse=True):
        try:
            ckpt = store.load(run.run_id, step)
        except CorruptCheckpointError as err:
            result.corrupt.append(err.to_dict() | {"found_unix": time.time()})
            continue
        result.checkpoint_loads += 1
        if ckpt.metadata.get("config_hash") not in (None, run.config_hash):
            raise ValueError(f"checkpoint {run.run_id}@{step} belongs to another configuration")
        trainer.restore(ckpt.tensors, ckpt.metadata)
        return ckpt.ref
    trainer.init_fresh()
    return None


def _agree_on_start(store: CheckpointStore, job: RankJob, row: RankGroup,
                    warm: WarmTrainer | None, result: RankResult) -> WarmTrainer:
    """Every rank of every replica ends with the same trainer state; a peer's memory is
    preferred to the store."""
    run = job.group.run
    key = (run.run_id, run.config_hash)
    group = row.world()
    trainer = warm.trainer if warm is not None else _build_trainer(run, row)
    trainer.sync = row
    have = {"step": -1, "hash": ""}
    if warm is not None and job.group.first_step <= trainer.step <= job.group.last_step:
        have = {"step": trainer.step, "hash": _hash_of(trainer)}
        if job.trusted is not None and (
                (job.trusted[0] == have["step"] and job.trusted[1] != have["hash"]) or
                (job.trusted[0] != have["step"] and job.world_rank not in job.peers)):
            # The flow settled a disagreement against this state, or it went on past the
            # disputed step in a replica the flow does not trust: it is no source.
            have = {"step": -1, "hash": ""}
    haves = group.all_gather_json(have)
    # The newest committed step, as the flow handed it (or as rank 0 sees it): every rank acts
    # on the same answer.
    newest = job.newest_step
    if newest is None and group.rank == 0:
        ref = store.latest_committed_ref(run.run_id)
        newest = ref.step if ref is not None and ref.step <= job.group.last_step else -1
    if job.newest_step is None:
        newest = int(group.broadcast_json(newest, src=0))
    result.newest_committed_at_start = newest
    best = max(h["step"] for h in haves)
    at_ref = warm.at_ref if warm is not None else None
    if best >= 0 and best >= newest:
        holders = [r for r, h in enumerate(haves) if h["step"] == best]
        src = min((r for r in holders if r in job.peers), default=min(holders))
        if any(h["step"] == best and h["hash"] != haves[src]["hash"] for h in haves):
            raise RanksDisagree(best, [h["hash"] for h in haves])
        if all(h == haves[src] for h in haves):
            result.restored_from = "warm"
        else:
            t0 = time.perf_counter()
            group.broadcast_state(trainer, src)
            result.peer_restore_s = time.perf_counter() - t0
            result.restored_from = "peer"
            at_ref = at_ref if have == haves[src] else None
    else:
        at_ref = _load_newest(store, job.group, trainer, result)
        result.restored_from = "checkpoint" if at_ref is not None else None
    # Whether the state in memory is a committed checkpoint decides whether the ranks save
    # before training: one answer for all, or one rank saves alone and the others wait for it.
    # A rank's own belief can differ (a peer's copy, a checkpoint rotted after this rank
    # committed it), so it is gathered: held by any rank, or the newest committed step; never
    # the group's end, which _committed_end found not verified.
    held = [CheckpointRef.from_dict(r) for r in group.all_gather_json(
        at_ref.to_dict() if at_ref is not None and at_ref.step == trainer.step else None) if r]
    if trainer.step == job.group.last_step or (not held and newest != trainer.step):
        at_ref = None
    else:
        at_ref = held[0] if held else store.ref(run.run_id, trainer.step)
    mine = _hash_of(trainer)
    hashes = group.all_gather_text(mine)
    if len(set(hashes)) != 1:
        raise RanksDisagree(trainer.step, hashes)
    result.start_step = trainer.step
    productive = warm.productive_s if warm is not None else 0.0
    return WarmTrainer(key, trainer, at_ref, productive)


def _save_shared(store: CheckpointStore, job: RankJob, group: RankGroup, warm: WarmTrainer,
                 result: RankResult, extra: dict[str, Any]) -> CheckpointRef:
    """Vote, write this rank's share, and commit once (rank 0) after every share is durable."""
    run = job.group.run
    trainer = warm.trainer
    t0 = time.perf_counter()
    tensors, meta = trainer.capture(extra)
    meta["config_hash"] = run.config_hash
    meta["workers"] = group.world_size
    hashes = group.all_gather_text(state_hash(tensors))
    if len(set(hashes)) != 1:
        raise RanksDisagree(trainer.step, hashes)
    session = Rendezvous.from_dict(job.rendezvous).namespace
    if job.replicas > 1:
        # A replica taking over from a dropped writer never mixes its shares with the
        # dropped one's half-written ones.
        session = f"{session}-r{job.replica}"
    for delay in SAVE_RETRY_DELAYS_S + (None,):
        try:
            receipt = store.write_share(run.run_id, trainer.step, tensors, session=session,
                                        rank=group.rank, world_size=group.world_size,
                                        state_hash=hashes[0])
            os.environ.pop(STORAGE_FAULT_ENV, None)
            break
        except TransientStoreError:
            if delay is None:
                raise
            time.sleep(delay)
    result.bytes_written += receipt.bytes_written
    result.bytes_reused += receipt.bytes_reused
    receipts = group.all_gather_json(receipt.to_json())
    outcome: dict[str, Any]
    if group.rank == 0:
        try:
            ref = store.commit_shares(run.run_id, trainer.step,
                                      [ShareReceipt.from_json(r) for r in receipts], meta,
                                      session=session, lease_epoch=run.lease_epoch)
            stats = store.last_save_stats
            outcome = {"ref": ref.to_dict(),
                       "committed": stats is None or stats.outcome == "committed"}
        except Exception as err:  # noqa: BLE001 - every rank must learn of it, then it raises
            outcome = {"error": f"{type(err).__name__}: {err}"}
            group.broadcast_json(outcome, src=0)
            raise
    outcome = group.broadcast_json(outcome if group.rank == 0 else None, src=0)
    if "error" in outcome:
        raise RuntimeError(f"commit of step {trainer.step} failed on rank 0: {outcome['error']}")
    ref = CheckpointRef.from_dict(outcome["ref"])
    if outcome["committed"]:
        result.checkpoints.append(ref.step)
    result.ckpt_s += time.perf_counter() - t0
    warm.at_ref = ref
    return ref


def _lost_save(g: GroupJob, step: int, newest_committed: int) -> bool:
    """Whether a checkpoint due inside this group before `step` was never committed (a
    background save that a failure cut short, the memory restored from a peer past it)."""
    due = step - step % g.ckpt_every
    return g.first_step < due < step and newest_committed < due


def _record_name(job: RankJob, kind: str, step: int) -> str:
    record = ChaosEvent(kind, step, job.rank, job.replica).record_name
    if job.rank == 0 and job.replica == 0:
        record = record.replace("chaos/", "chaos-ranks/", 1) + "-0.0"
    return record


def _fire(job: RankJob, store: CheckpointStore, kind: str, step: int) -> bool:
    """True the first time this run reaches the event (recorded, so a rerun does not refire)."""
    return store.create_json_exclusive(job.group.run.run_id, _record_name(job, kind, step), {
        "fired_unix": time.time(), "pid": os.getpid(), "worker": progress.worker_name(),
        "rank": job.rank})


def _perturb_one_ulp(trainer: Trainer) -> None:
    """Silent data corruption as a faulty GPU or DIMM makes it: one weight moves by one ulp."""
    import torch

    with torch.no_grad():
        weight = max(trainer.model.parameters(), key=lambda p: p.numel()).view(-1)
        # The largest weight in magnitude: an optimizer step moves it by far less than itself,
        # so the ulp survives the rounding of the next updates. A small one's ulp is below the
        # spacing of its updated value, and the next step may round both copies alike: the
        # ranks would agree again and the corruption would be no test of the vote.
        at = int(weight.abs().argmax())
        weight[at] = torch.nextafter(weight[at], weight[at] + weight[at].sign())


def _chaos_before_step(job: RankJob, store: CheckpointStore, step: int,
                       trainer: Trainer) -> None:
    for kind, at in job.chaos_rank_events:
        if kind == "kill-before-commit" and step == at + 3:
            _await_kill_before_commit(job, store, at)
        if at != step or kind not in ("raise", "kill-worker", "hang", "perturb-replica") \
                or not _fire(job, store, kind, at):
            continue
        if kind == "perturb-replica":
            _perturb_one_ulp(trainer)
        if kind == "raise":
            raise chaos.ChaosError(f"chaos: raise@{step}/{job.rank}")
        if kind == "kill-worker":
            chaos.kill_this_process()
        if kind == "hang":
            chaos.hang(HANG_DURATION)


def _arm_kill_during_save(job: RankJob, store: CheckpointStore, step: int) -> None:
    for kind, at in job.chaos_rank_events:
        if kind == "kill-during-save" and at == step and _fire(job, store, kind, at):
            os.environ[STORAGE_FAULT_ENV] = "chunks:2"


def _corrupt_after_commit(job: RankJob, store: CheckpointStore, ref: CheckpointRef) -> bool:
    for kind, at in job.chaos_rank_events:
        if kind == "corrupt-latest" and at == ref.step and _fire(job, store, kind, at):
            chaos.rot_largest_chunk(store, ref)
            return True
    return False


def _fail_probe(job: RankJob, store: CheckpointStore, worker: str | None) -> None:
    for kind, at in job.chaos_rank_events:
        if kind == "fail-probe" and job.group.first_step < at <= job.group.last_step \
                and _fire(job, store, kind, at):
            raise health.WorkerUnhealthy(worker, f"chaos: fail-probe@{at}/{job.rank}")


def _is_vote_step(job: RankJob, step: int) -> bool:
    if job.replicas < 2 or job.policy != "vote":
        return False
    g = job.group
    return step == g.last_step or step % g.ckpt_every == 0 or \
        (job.vote_every is not None and step % job.vote_every == 0)


def _vote(job: RankJob, group: RankGroup, trainer: Trainer, result: RankResult) -> None:
    t0 = time.perf_counter()
    # Before a commit every ballot must be in: the writer waits for it at a checkpoint, and
    # everyone at the group's end (a replica's result is taken only once the vote agreed).
    # Others post and go on: they would only wait for the writer's save.
    g = job.group
    before_commit = trainer.step == g.last_step or \
        (trainer.step % g.ckpt_every == 0 and writer(group) == job.replica)
    result.vote_wait_s += vote(group, trainer.step, _hash_of(trainer), result.pending_votes,
                               wait=before_commit)
    result.vote_s += time.perf_counter() - t0
    result.votes += 1


def _checkpoint(store: CheckpointStore, job: RankJob, group: RankGroup, warm: WarmTrainer,
                result: RankResult, extra: dict[str, Any]) -> CheckpointRef | None:
    """Save at a checkpoint step. With replicas one replica writes (the lowest not dropped);
    the others write nothing: they wait for its commit and take over when the writer is
    dropped first, so no planned checkpoint is skipped when the writer dies mid-group. The
    wait costs no wall time: the group ends with the writer's last commit anyway."""
    if job.replicas < 2:
        return _save_shared(store, job, group, warm, result, extra)
    step = warm.trainer.step
    while True:
        by = writer(group)
        if by == job.replica:
            ref = _save_shared(store, job, group, warm, result, extra)
            if group.rank == 0:
                announce_commit(group, step, ref.to_dict())
            return ref
        if by is None:
            return None
        done = await_commit(group, step, by)
        if done is not None:
            ref = CheckpointRef.from_dict(done)
            warm.at_ref = ref
            return ref


_KILL_BEFORE_COMMIT_ARMED = threading.Event()
"""Set by the committing thread once it holds a kill-before-commit (this process is to die)."""


def _await_kill_before_commit(job: RankJob, store: CheckpointStore, at: int) -> None:
    """The training thread, done with step at+2, stops until the committing thread kills the
    process: without this a loaded machine lets training run on to the group's end before
    the kill, and the survivors' memory would be at a checkpoint step, not ahead of one."""
    if not _KILL_BEFORE_COMMIT_ARMED.is_set() and store.read_json(
            job.group.run.run_id, _record_name(job, "kill-before-commit", at)) is not None:
        return  # fired in an earlier process: this is the attempt after the kill
    if _KILL_BEFORE_COMMIT_ARMED.wait(30.0):
        time.sleep(30.0)  # the committing thread sees step at+2 and kills; a bound, not a wait


def _kill_before_commit(job: RankJob, store: CheckpointStore, step: int,
                        trainer_step: Callable[[], int]) -> None:
    """kill-before-commit@STEP: the rank about to commit STEP's background checkpoint (every
    share durable) SIGKILLs itself once its training has gone two steps past STEP, so that the
    survivors' memory is ahead of a checkpoint that never became visible."""
    for kind, at in job.chaos_rank_events:
        if kind == "kill-before-commit" and at == step and _fire(job, store, kind, at):
            _KILL_BEFORE_COMMIT_ARMED.set()
            deadline = time.monotonic() + 30.0  # the group's end waits for this save
            while trainer_step() < step + 2 and time.monotonic() < deadline:
                time.sleep(0.005)  # polling: the training thread's step counter
            chaos.kill_this_process()


def _background_saves(store: CheckpointStore, job: RankJob, group: RankGroup,
                      result: RankResult,
                      on_commit: Callable[[CheckpointRef, SaveStats], None],
                      trainer_step: Callable[[], int]) -> RankSaves | None:
    """This rank's background saves for the group (None without --async-save). With replica
    groups only the writing replica saves a checkpoint inside the group (`_writes_now`), and
    tells the others what it committed, as an in-line save does."""
    g = job.group
    run = g.run
    if not run.async_save:
        return None
    session = Rendezvous.from_dict(job.rendezvous).namespace
    if job.replicas > 1:
        session = f"{session}-r{job.replica}"  # as _save_shared: never mixed with another's

    def commit(step: int, receipts: list[ShareReceipt],
               meta: dict[str, Any]) -> tuple[CheckpointRef, SaveStats]:
        _kill_before_commit(job, store, step, trainer_step)
        ref = store.commit_shares(run.run_id, step, receipts, meta, session=session,
                                  lease_epoch=run.lease_epoch)
        stats = store.last_save_stats or SaveStats()
        if job.replicas > 1:
            announce_commit(group, step, ref.to_dict())
        store.gc(run.run_id, keep_last=run.keep_last, protect=g.protect_steps,
                 just_committed=ref)
        return ref, stats

    saves = RankSaves(store, run_id=run.run_id, rank=group.rank, world_size=group.world_size,
                      session=session, board=group.board, timeout=group.rdv.timeout,
                      replica=job.replica, commit=commit, on_commit=on_commit,
                      gather_hashes=group.all_gather_text, disagree=RanksDisagree)
    result.ckpt_s += saves.waited_at_start_s
    return saves


def _writes_now(job: RankJob, group: RankGroup) -> bool:
    """Whether this replica writes the checkpoint inside the group at this step: the lowest
    replica not dropped. Its ranks may see a drop at different moments, so they agree first
    (drops only ever raise the writer: the highest view is the newest); every replica asks,
    and the others go on training: nobody waits for a save inside the group."""
    if job.replicas < 2:
        return True
    views = group.all_gather_text(str(writer(group)))
    newest = max((int(v) for v in views if v != "None"), default=None)
    return newest == job.replica


def _recompute(job: RankJob, store: CheckpointStore, group: RankGroup,
               result: RankResult) -> RankResult:
    """A third opinion: from the newest checkpoint to `recompute_to`, nothing written."""
    run = job.group.run
    trainer = _build_trainer(run, group)
    target = dataclasses.replace(job.group, last_step=int(job.recompute_to or 0))
    ref = _load_newest(store, target, trainer, result)
    result.restored_from = "checkpoint" if ref is not None else None
    result.start_step = trainer.step
    while trainer.step < target.last_step:
        step_result = trainer.train_step()
        result.steps_trained += 1
        result.train_s += step_result.seconds
    result.step = trainer.step
    result.state_hash = _hash_of(trainer)
    put_warm(WarmTrainer((run.run_id, run.config_hash), trainer, None, 0.0))
    return result


def run_rank(job: RankJob) -> RankResult:
    """Train (first_step, last_step] as one rank of a data-parallel group."""
    g = job.group
    run = g.run
    store = open_store(run.store_url, **run.store_options())
    started_unix = time.time()
    result = RankResult(rank=job.rank, worker=progress.worker_name(), replica=job.replica)
    done = _committed_end(store, g) if job.recompute_to is None else None
    if done is not None:
        result.ref, result.step, result.reused = done.to_dict(), done.step, True
        return result
    device = str(resolve_device(run.device))
    group = rank_group_for(Rendezvous.from_dict(job.rendezvous), job.world_rank, device,
                           row_size=job.world_size)
    try:
        # Probed once joined: an unhealthy rank that leaves breaks its peers' next collective
        # at once, where one that never joined would keep them waiting the collective timeout.
        _fail_probe(job, store, result.worker)
        health.probe(store, run.run_id, result.worker)
    except BaseException:
        leave_group()
        raise
    if job.recompute_to is not None:
        drop_warm()
        try:
            return _recompute(job, store, group, result)
        except CollectiveError as err:
            leave_group()
            raise PeerLost(job.rank, -1, str(err)) from None
    warm = take_warm((run.run_id, run.config_hash))
    try:
        warm = _agree_on_start(store, job, group, warm, result)
    except CollectiveError as err:
        leave_group()
        if warm is not None:
            put_warm(warm)  # untouched: a restore never half-applies
        raise PeerLost(job.rank, warm.trainer.step if warm else -1, str(err)) from None
    except BaseException:
        drop_warm()
        raise
    trainer = warm.trainer
    # Who holds which rank now (operators and fire drills find a rank's process here).
    store.write_json(run.run_id, f"ranks/{job.name}", {
        "pid": os.getpid(), "worker": result.worker, "first_step": g.first_step,
        "last_step": g.last_step, "step": trainer.step, "unix": time.time(),
        "replica": job.replica, "namespace": Rendezvous.from_dict(job.rendezvous).namespace})
    # Rank 0 keeps the attempt record the flow rebuilds the run's timing from (see
    # tasks/group_runner.py): it survives a rank that raises or a worker that dies.
    attempt: dict[str, Any] | None = None
    if job.rank == 0 and job.replica == 0:
        result.attempt = f"attempts/{attempt_name(job)}"
        attempt = {"first_step": g.first_step, "last_step": g.last_step, "pid": os.getpid(),
                   "worker": result.worker, "started_unix": started_unix,
                   "ready_unix": time.time(), "rank": 0, "world_size": job.world_size,
                   "replicas": job.replicas,
                   "resumed_from_step": result.start_step
                   if result.restored_from == "checkpoint" else None,
                   "warm": result.restored_from in ("warm", "peer"),
                   "restored_from": result.restored_from,
                   "resumed_productive_s": warm.productive_s, "first_step_unix": None,
                   "checkpoints": [],
                   "corrupt": [c | {"fell_back_to": result.start_step} for c in result.corrupt]}
        store.write_json(run.run_id, result.attempt, attempt)

    def record(**fields: Any) -> None:
        if attempt is not None:
            attempt.update(fields)
            store.write_json(run.run_id, result.attempt, attempt)

    progress.emit(run.run_id, step=trainer.step, phase="ready", rank=job.rank,
                  replica=job.replica, attempt=result.attempt)
    productive_s = warm.productive_s
    ref = warm.at_ref

    def committed_in_background(done: CheckpointRef, stats: SaveStats) -> None:
        nonlocal ref
        ref = done
        if stats.outcome == "committed":
            result.checkpoints.append(done.step)
            if attempt is not None:
                attempt.setdefault("background_checkpoints", []).append(done.step)
            record(checkpoints=list(result.checkpoints))
        _corrupt_after_commit(job, store, done)  # the rot is for a later load to find

    saves = _background_saves(store, job, group, result, committed_in_background,
                              lambda: trainer.step)
    drag = StepDrag()
    cpu_started, wall_started = time.process_time(), time.time()
    try:
        if trainer.step > g.first_step and (ref is None or ref.step != trainer.step) and (
                trainer.step % g.ckpt_every == 0 or (job.replicas == 1 and _lost_save(
                    g, trainer.step, result.newest_committed_at_start))):
            # The attempt before this one was lost while saving this step: save it now (the
            # shares it wrote already are reused), so the checkpoint schedule has no hole. Or
            # it was lost while its ranks saved an earlier step in the background, and the
            # survivors' memory went on past it: save the state they hold now, so the hole
            # lasts until this step, not until the next one due. (With replica groups the
            # other replicas train on through a rank's loss and commit the group's end.)
            if _is_vote_step(job, trainer.step):
                _vote(job, group, trainer, result)
            t0 = time.perf_counter()
            ref = _checkpoint(store, job, group, warm, result,
                              {"productive_s": productive_s}) or ref
            result.ckpt_s += time.perf_counter() - t0  # training waited for it
        while trainer.step < g.last_step:
            _chaos_before_step(job, store, trainer.step + 1, trainer)
            in_flight = saves is not None and saves.busy
            step_result = trainer.train_step()
            if saves is not None:
                drag.add(step_result.seconds, in_flight)
                result.background_drag_s = drag.seconds()
                result.background_overlap_steps = drag.overlapped
                saves.poll()  # a background failure surfaces at the next step
            productive_s += step_result.seconds
            result.steps_trained += 1
            result.train_s += step_result.seconds
            result.tokens += step_result.tokens
            result.losses.append((trainer.step, step_result.loss))
            if result.first_step_unix is None:
                result.first_step_unix = time.time()
                record(first_step_unix=result.first_step_unix)
            if _is_vote_step(job, trainer.step):
                _vote(job, group, trainer, result)
            save_s = 0.0
            if saves is not None and trainer.step % g.ckpt_every == 0 and \
                    trainer.step < g.last_step:
                if _writes_now(job, group):
                    save_s = saves.submit(
                        warm, {"productive_s": productive_s, "train_loss": step_result.loss},
                        {"config_hash": run.config_hash, "workers": group.world_size},
                        before=lambda at=trainer.step: _arm_kill_during_save(job, store, at))
                    result.background_saves += 1
                result.ckpt_s += save_s
                result.background_stall_s += save_s
            elif trainer.step % g.ckpt_every == 0 or trainer.step == g.last_step:
                if saves is not None:
                    # Committed in order: the group's end comes after the save in flight.
                    waited = saves.wait()
                    result.ckpt_s += waited
                    result.background_stall_s += waited
                _arm_kill_during_save(job, store, trainer.step)
                t0 = time.perf_counter()
                ref = _checkpoint(store, job, group, warm, result,
                                  {"productive_s": productive_s,
                                   "train_loss": step_result.loss}) or ref
                save_s = time.perf_counter() - t0
                if ref is not None and ref.step in result.checkpoints:
                    record(checkpoints=list(result.checkpoints))
                if ref is not None and ref.step == trainer.step and \
                        _corrupt_after_commit(job, store, ref):
                    warm.at_ref = None  # the rot is for the next load to find
            progress.emit(run.run_id, step=trainer.step, loss=step_result.loss,
                          tokens=step_result.tokens, seconds=step_result.seconds,
                          save_s=save_s, rank=job.rank, replica=job.replica,
                          attempt=result.attempt, ckpt=ref.step if ref is not None else None)
        if saves is not None:
            result.ckpt_s += saves.wait()
        if ref is None or ref.step != trainer.step:
            if _is_vote_step(job, trainer.step) and not result.votes:
                _vote(job, group, trainer, result)
            ref = _checkpoint(store, job, group, warm, result,
                              {"productive_s": productive_s}) or ref
    except (CollectiveError, ReplicasDisagree) as err:
        # The failed step applied nothing, and a vote compares a finished step: this memory is
        # the state after trainer.step (the flow decides whom to trust after a disagreement).
        warm.at_ref = ref if ref is not None and ref.step == trainer.step else None
        warm.productive_s = productive_s
        if saves is not None:
            saves.cancel()
        leave_group()
        put_warm(warm)
        if isinstance(err, ReplicasDisagree):
            raise
        raise PeerLost(job.rank, trainer.step, str(err)) from None
    except BaseException:
        if saves is not None:
            saves.cancel()
        leave_group()
        drop_warm()
        raise
    if saves is not None:
        result.bytes_written += saves.bytes_written
        result.bytes_reused += saves.bytes_reused
    if ref is None or ref.step != trainer.step:
        raise RuntimeError(f"replica {job.replica}: no checkpoint of step {trainer.step} "
                           "was committed (every writer dropped)")
    warm.productive_s = productive_s
    put_warm(warm)
    result.cpu_s = time.process_time() - cpu_started
    result.window_unix = (wall_started, time.time())
    record(checkpoints=list(result.checkpoints), ended_unix=time.time(),
           bytes_reused=result.bytes_reused)
    result.ref, result.step = ref.to_dict(), ref.step
    result.state_hash = _hash_of(trainer)
    tail = [loss for _, loss in result.losses[-10:]]
    result.train_loss = sum(tail) / len(tail) if tail else None
    return result


def attempt_name(job: RankJob) -> str:
    """A unique name for this rank's attempt (records, logs)."""
    return f"{job.group.last_step:012d}-{uuid.uuid4().hex[:8]}"
