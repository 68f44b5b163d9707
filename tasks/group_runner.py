"""One batch group, start to finish: find where to start, train, checkpoint, hand back a reference.

Safe to run twice (a Dask worker can die after finishing, and its task then runs again): all it
produces is committed checkpoints in the store, and a group whose end is already committed and
verified returns that checkpoint without training.
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import timedelta

from storage import CheckpointRef, CorruptCheckpointError, TransientStoreError, lease, open_store
from storage.faults import ENV as STORAGE_FAULT_ENV
from storage.lease import LeaseLostError
from storage.store import CheckpointStore, SaveStats
from tasks import chaos, health, progress
from tasks.background_saves import GroupSaves, StepDrag, settle_previous
from tasks.jobs import GroupJob, GroupResult, RunSpec
from tasks.worker_cache import (
    WarmTrainer,
    corpus_for,
    drop_warm,
    put_warm,
    take_spare,
    take_warm,
)
from training.config import TrainConfig
from training.loop import Trainer

HANG_DURATION = timedelta(hours=1)
"""How long a `hang` chaos event stalls: far beyond any task timeout."""

SAVE_RETRY_DELAYS_S = (0.5, 1.0, 2.0)
"""Backoff between tries of a checkpoint save that failed on transient I/O."""


def build_trainer(run: RunSpec) -> Trainer:
    """A trainer for the run, with the corpus this worker already holds."""
    spare = take_spare((run.run_id, run.config_hash))  # built while this worker stood by
    if spare is not None:
        return spare
    cfg = TrainConfig(**run.train_config).resolved()
    return Trainer(cfg, corpus_for(run.data_path), device=run.device)


def _verified_committed(store: CheckpointStore, run_id: str, step: int) -> CheckpointRef | None:
    if step not in store.steps(run_id):
        return None
    if not store.verify(run_id, step).ok:
        return None
    return store.ref(run_id, step)


def _record_attempt(store: CheckpointStore, job: GroupJob, name: str, doc: dict) -> None:
    """One record per attempt, so the flow learns of reruns Prefect does not count."""
    store.write_json(job.run.run_id, name, doc)


def _restore_start(store: CheckpointStore, job: GroupJob, result: GroupResult,
                   corrupt: list[dict]) -> WarmTrainer:
    """The trainer at the newest verified checkpoint <= last_step (warm memory when it matches).

    Each corrupt checkpoint passed over is appended to `corrupt` (run, step, array, chunk,
    reason) for the run's failure timeline; the load that finds it is the only full read.
    """
    run = job.run
    key = (run.run_id, run.config_hash)
    warm = take_warm(key)
    committed = [s for s in store.steps(run.run_id) if s <= job.last_step]
    if _goes_on_from_memory(store, warm, job, committed):
        result.warm = True
        result.resumed_from_step = job.first_step
        return warm
    for step in sorted(committed, reverse=True):
        if warm is not None and warm.at_ref is not None and warm.at_ref.step == step:
            if store.ref(run.run_id, step) == warm.at_ref:
                result.warm = True
                result.resumed_from_step = step
                warm.lineage = warm.at_ref
                return warm
        t0 = time.perf_counter()
        try:
            ckpt = store.load(run.run_id, step)
        except CorruptCheckpointError as err:
            result.corrupt.append(str(err))
            corrupt.append(err.to_dict() | {"found_unix": time.time()})
            continue
        if ckpt.metadata.get("config_hash") not in (None, run.config_hash):
            raise ValueError(
                f"checkpoint {run.run_id}@{step} belongs to another configuration "
                f"({ckpt.metadata.get('config_hash')} != {run.config_hash})"
            )
        trainer = warm.trainer if warm is not None else build_trainer(run)
        trainer.restore(ckpt.tensors, ckpt.metadata)
        result.load_s += time.perf_counter() - t0
        result.resumed_from_step = step
        return WarmTrainer(key, trainer, ckpt.ref, float(ckpt.metadata.get("productive_s", 0.0)),
                           lineage=ckpt.ref)
    # Nothing verified (a new run, or every checkpoint corrupt: result.corrupt says so): start over.
    trainer = warm.trainer if warm is not None else build_trainer(run)
    trainer.init_fresh()
    result.resumed_from_step = None
    return WarmTrainer(key, trainer, None)


def _goes_on_from_memory(store: CheckpointStore, warm: WarmTrainer | None, job: GroupJob,
                         committed: list[int]) -> bool:
    """Whether the warm memory is this group's start although no checkpoint is: the previous
    group on this worker ended there without one (GroupJob.save_end), and the newest committed
    checkpoint is still the newest of that memory's own history (nothing else committed since,
    and the bytes it named are the ones there)."""
    if warm is None or warm.at_ref is not None or warm.lineage is None:
        return False
    if warm.trainer.step != job.first_step or not committed:
        return False
    newest = max(committed)
    return newest == warm.lineage.step and store.ref(job.run.run_id, newest) == warm.lineage


def _fire(event: chaos.ChaosEvent, store: CheckpointStore, run_id: str) -> bool:
    """True when this event has not fired in this run before (and is now recorded as fired)."""
    return store.create_json_exclusive(
        run_id, event.record_name, {"fired_unix": time.time(), "pid": os.getpid(),
                                    "worker": progress.worker_name()})


def _inject_before_step(plan: chaos.ChaosPlan, store: CheckpointStore, job: GroupJob,
                        step: int, random_events: list[chaos.ChaosEvent]) -> None:
    for event in plan.events_at(step) + [e for e in random_events if e.step == step]:
        if event.kind not in ("raise", "kill-worker", "hang") or not _fire(event, store, job.run.run_id):
            continue
        if event.kind == "raise":
            raise chaos.ChaosError(f"chaos: raise@{step}")
        if event.kind == "kill-worker":
            chaos.kill_this_process()
        if event.kind == "hang":
            chaos.hang(HANG_DURATION)


def _arm_kill_during_save(plan: chaos.ChaosPlan, store: CheckpointStore, job: GroupJob,
                          step: int) -> None:
    """kill-during-save: the writer SIGKILLs itself after a few chunk files of this save."""
    for event in plan.events_at(step):
        if event.kind == "kill-during-save" and _fire(event, store, job.run.run_id):
            os.environ[STORAGE_FAULT_ENV] = "chunks:3"


def _corrupt_after_commit(plan: chaos.ChaosPlan, store: CheckpointStore, job: GroupJob,
                          ref: CheckpointRef) -> bool:
    """corrupt-latest: flip one byte of one chunk of the checkpoint just committed."""
    for event in plan.events_at(ref.step):
        if event.kind == "corrupt-latest" and _fire(event, store, job.run.run_id):
            chaos.rot_largest_chunk(store, ref)
            return True
    return False


def _save(store: CheckpointStore, warm: WarmTrainer, result: GroupResult, run: RunSpec,
          extra: dict) -> CheckpointRef:
    """Commit the trainer's state; transient I/O errors are retried with backoff."""
    t0 = time.perf_counter()
    tensors, meta = warm.trainer.capture(extra)
    meta["config_hash"] = run.config_hash
    for attempt, delay in enumerate(SAVE_RETRY_DELAYS_S + (None,)):
        try:
            ref = store.save(run.run_id, warm.trainer.step, tensors, meta,
                             lease_epoch=run.lease_epoch)
            os.environ.pop(STORAGE_FAULT_ENV, None)  # an armed fault is for one save only
            break
        except TransientStoreError as err:
            if delay is None:
                raise
            result.save_retries.append(f"step {warm.trainer.step} try {attempt + 1}: {err}")
            time.sleep(delay)
    stats = store.last_save_stats
    if stats is not None:
        result.bytes_reused += stats.bytes_reused
    result.ckpt_s += time.perf_counter() - t0
    if stats is None or stats.outcome == "committed":
        result.checkpoints.append(ref.step)  # not a step found already committed
    warm.at_ref = warm.lineage = ref
    return ref


def _save_and_prune(store: CheckpointStore, warm: WarmTrainer, result: GroupResult, job: GroupJob,
                    extra: dict) -> tuple[CheckpointRef, float]:
    """Save, then retention; returns the ref and the seconds training stalled for both."""
    t0 = time.perf_counter()
    ref = _save(store, warm, result, job.run, extra)
    t1 = time.perf_counter()
    # Retention keeps the newest verified checkpoint: the one just written needs no read back.
    store.gc(job.run.run_id, keep_last=job.run.keep_last, protect=job.protect_steps,
             just_committed=ref)
    result.ckpt_s += time.perf_counter() - t1
    return ref, time.perf_counter() - t0


def run_group(job: GroupJob) -> GroupResult:
    """Train the group (first_step, last_step] and return a reference to its last checkpoint."""
    run = job.run
    store = open_store(run.store_url, **run.store_options())
    result = GroupResult(ref={}, step=job.first_step, worker=progress.worker_name())
    if run.async_save:
        # The previous group's end may still be committing on this worker: its wait is stall.
        result.ckpt_s += settle_previous()
    done = _verified_committed(store, run.run_id, job.last_step)
    if done is not None:
        result.ref, result.step, result.reused = done.to_dict(), done.step, True
        return result
    if run.lease_epoch is not None:
        # A coordinator that lost its lease stops at the next group: no training to throw away.
        lease.check(store.backend, run.run_id, run.lease_epoch)
    started_unix = time.time()
    plan = chaos.parse_chaos(run.chaos_spec)
    random_events = plan.random_events(int(run.train_config.get("seed", 0)), job.first_step,
                                       job.last_step)
    for event in plan.events:
        if event.kind == "fail-probe" and job.first_step < event.step <= job.last_step \
                and _fire(event, store, run.run_id):
            raise health.WorkerUnhealthy(result.worker, f"chaos: fail-probe@{event.step}")
    health.probe(store, run.run_id, result.worker)
    corrupt: list[dict] = []
    warm = _restore_start(store, job, result, corrupt)
    attempt_name = f"attempts/{job.last_step:012d}-{uuid.uuid4().hex[:8]}"
    # The flow rebuilds the run's story from these records (flows/failures.py): they survive
    # a task that raises or a worker that dies, where the task's result does not.
    attempt = {"first_step": job.first_step, "last_step": job.last_step, "pid": os.getpid(),
               "worker": progress.worker_name(), "started_unix": started_unix,
               "ready_unix": time.time(), "resumed_from_step": result.resumed_from_step,
               "warm": result.warm, "resumed_productive_s": warm.productive_s,
               "first_step_unix": None, "checkpoints": [],
               "corrupt": [c | {"fell_back_to": result.resumed_from_step} for c in corrupt]}
    _record_attempt(store, job, attempt_name, attempt)
    result.attempt = attempt_name
    trainer = warm.trainer
    progress.emit(run.run_id, step=trainer.step, phase="ready", attempt=attempt_name)
    productive_s = warm.productive_s
    losses: list[float] = []
    ref = warm.at_ref

    def committed_in_background(done: CheckpointRef, stats: SaveStats) -> None:
        nonlocal ref
        ref = done
        result.bytes_reused += stats.bytes_reused
        if stats.outcome == "committed":
            result.checkpoints.append(done.step)
            attempt["checkpoints"].append(done.step)
            attempt.setdefault("background_checkpoints", []).append(done.step)
            _record_attempt(store, job, attempt_name, attempt)
        if _corrupt_after_commit(plan, store, job, done):
            warm.lineage = None  # the rot is for a later load to find: the next group loads

    saves = GroupSaves(store, job, result, committed_in_background) if run.async_save else None
    drag = StepDrag()
    pending_end = False
    try:
        while trainer.step < job.last_step:
            next_step = trainer.step + 1
            _inject_before_step(plan, store, job, next_step, random_events)
            in_flight = saves is not None and saves.busy
            step_result = trainer.train_step()
            if saves is not None:
                drag.add(step_result.seconds, in_flight)
                result.background_drag_s = drag.seconds()
                result.background_overlap_steps = drag.overlapped
            productive_s += step_result.seconds
            result.steps_trained += 1
            result.train_s += step_result.seconds
            result.tokens += step_result.tokens
            losses.append(step_result.loss)
            result.losses.append((trainer.step, step_result.loss))
            if attempt["first_step_unix"] is None:
                # When this attempt first completed a step: the end of a recovery.
                attempt["first_step_unix"] = time.time()
                _record_attempt(store, job, attempt_name, attempt)
            at_boundary = trainer.step % job.ckpt_every == 0 or (
                trainer.step == job.last_step and job.save_end)
            past_deadline = job.deadline_unix is not None and time.time() >= job.deadline_unix
            save_s = 0.0
            if saves is not None:
                saves.poll()  # a background failure surfaces at the next step, not the group end
            group_ends = trainer.step == job.last_step or past_deadline
            end_in_background = group_ends and not job.commit_end and not past_deadline
            if at_boundary and saves is not None and (not group_ends or end_in_background):
                save_s = saves.submit(
                    warm, {"productive_s": productive_s, "train_loss": step_result.loss},
                    group_end=end_in_background,
                    before=lambda at=trainer.step: _arm_kill_during_save(plan, store, job, at))
                pending_end = end_in_background
            elif at_boundary or past_deadline:
                if saves is not None:
                    save_s = saves.wait()  # committed in order: the group's end comes last
                _arm_kill_during_save(plan, store, job, trainer.step)
                ref, end_save_s = _save_and_prune(store, warm, result, job, {
                    "productive_s": productive_s, "train_loss": step_result.loss})
                save_s += end_save_s
                if ref.step in result.checkpoints:
                    attempt["checkpoints"].append(ref.step)
                    _record_attempt(store, job, attempt_name, attempt)
                if _corrupt_after_commit(plan, store, job, ref):
                    # Bit rot is found by the next load: make sure one happens (the memory
                    # itself is fine: it stays this task's to train on).
                    warm.at_ref = warm.lineage = None
            progress.emit(run.run_id, step=trainer.step, loss=step_result.loss,
                          tokens=step_result.tokens, seconds=step_result.seconds,
                          save_s=save_s, attempt=attempt_name,
                          ckpt=ref.step if ref is not None else None)
            if past_deadline:
                result.stopped_early = True
                break
    except LeaseLostError as err:
        drop_warm()
        # The commit was refused: say so where the run's story is kept (a stale coordinator
        # may not be there to hear the task's error).
        attempt["lease_lost"] = {"step": trainer.step, "unix": time.time(), "reason": str(err)}
        _record_attempt(store, job, attempt_name, attempt)
        raise
    except BaseException:
        drop_warm()
        raise
    if saves is not None and not pending_end:
        saves.wait()
    elif saves is not None:
        saves.record()
    if ref is None and not pending_end and job.save_end:
        # The group trained nothing new (its start already was its end): commit the start.
        ref = _save(store, warm, result, run, {"productive_s": productive_s})
        attempt["checkpoints"] += [ref.step] if ref.step in result.checkpoints else []
    ends_bare = not pending_end and (ref is None or ref.step != trainer.step)
    if ends_bare:
        warm.at_ref = None  # the memory went on past every checkpoint: its lineage says whence
    warm.productive_s = productive_s
    put_warm(warm)
    attempt.update(ended_unix=time.time(), bytes_reused=result.bytes_reused,
                   save_retries=len(result.save_retries))
    _record_attempt(store, job, attempt_name, attempt)
    if pending_end or ends_bare:
        # The end checkpoint is still being written, or there is none (GroupJob.save_end):
        # hand back the newest one committed.
        result.ref, result.step = (ref.to_dict() if ref is not None else {}), trainer.step
    else:
        result.ref, result.step = ref.to_dict(), ref.step
    tail = losses[-10:]
    result.train_loss = sum(tail) / len(tail) if tail else None
    return result
