"""A data-parallel batch group: N rank tasks on N workers, re-formed when a rank is lost.

The flow keeps the membership (which worker holds which rank) and the rendezvous (a TCPStore in
this process, so it survives any worker). A group is N Prefect tasks pinned one per worker. When
one fails — its process killed, its worker lost, its collective timed out, its task raised — the
others fail their next collective and keep their state at the last completed step (PeerLost).
The flow then takes the lost worker out, fills the rank from the spares (or the restarted
worker), hands out a new namespace and submits the group again: the newcomer receives the
survivors' state over the new process group, and the store is read only when no live rank holds
state at or after the newest checkpoint (tasks/rank_runner.py decides that, on every rank alike).
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from flows.supervise import ClusterWatch, InfrastructureError, Watchdog
from storage import FatalStoreError, open_store
from tasks.health import WorkerUnhealthy
from tasks.jobs import GroupJob
from tasks.rank_jobs import PeerLost, RankJob, RanksDisagree
from tasks.replica_board import ReplicasDisagree
from training.rendezvous import RendezvousServer

HANG_GRACE = timedelta(seconds=1)
"""After a peer reported a failed collective, a rank still silent this much past the collective
timeout is taken for hung: its worker is restarted."""

LAG_GRACE = timedelta(seconds=2)
"""Policy first: once one replica has finished a group, the other live replicas (in lockstep,
a moment behind) are waited for this long at most; one still running after it is left to
finish on its own, its next task queued behind it."""

THIRD_OPINION_TIMEOUT = timedelta(minutes=10)


@dataclass
class RankFailure:
    """One failure of a data-parallel group, as the summary reports it (DESIGN.md section 4)."""

    kind: str
    step: int
    """The step in flight when it struck."""
    worker: str | None
    failed_unix: float
    detected_unix: float
    lost_steps: int = 0
    restored_from: str | None = None
    recovered_unix: float | None = None
    reason: str = ""
    checkpoint_loads: int | None = None
    """Checkpoints the ranks read from the store to recover (0 for a peer restore)."""
    hashes: dict[str, str] | None = None
    """An `sdc` failure: the trusted state hash and the dissenting one."""

    def entry(self) -> dict[str, Any]:
        extra = {"hashes": self.hashes} if self.hashes else {}
        return extra | {"kind": self.kind, "step": self.step, "worker": self.worker,
                "detected_after_s": round(max(0.0, self.detected_unix - self.failed_unix), 3),
                "recovered_after_s": round(max(0.0, (self.recovered_unix or self.detected_unix)
                                               - self.failed_unix), 3),
                "lost_steps": self.lost_steps, "restored_from": self.restored_from,
                "checkpoint_loads": self.checkpoint_loads, "reason": self.reason,
                "at_unix": round(self.failed_unix, 3)}


@dataclass
class _Attempt:
    results: dict[int, dict[str, Any]] = field(default_factory=dict)
    peer_lost: dict[int, PeerLost] = field(default_factory=dict)
    errors: dict[int, BaseException] = field(default_factory=dict)
    lost_workers: dict[str, str] = field(default_factory=dict)
    """worker -> why it is out (killed, hung, unhealthy)."""
    first_failure_unix: float | None = None
    failed_unix: float | None = None
    failed_replicas: dict[int, float] = field(default_factory=dict)
    """replica -> when it was first seen failing (its other ranks stop at their next collective)."""
    winner: int | None = None
    """The first replica whose every rank finished the group."""


class DataParallelGroups:
    """Runs batch groups on `world_size` ranks, keeping the membership between groups."""

    def __init__(self, watch: ClusterWatch, server: RendezvousServer, run_id: str,
                 world_size: int, collective_timeout: timedelta, dog: Watchdog,
                 budget: int,
                 chaos_for_rank: Callable[[int, int, int, int], tuple[tuple[str, int], ...]],
                 on_event: Callable[[str], None], replicas: int = 1, policy: str = "first",
                 vote_every: int | None = None) -> None:
        self.replicas = replicas
        self.policy = policy
        self.vote_every = vote_every
        self.total = world_size * replicas
        """Workers holding a rank: world_size ranks in each of `replicas` replica groups."""
        self.prefer: list[str] = []
        """Spares to fill a slot with first (a third opinion left the trusted state there)."""
        self.holders: list[int] = []
        """World ranks of the replica that finished the last group (its memory is the newest)."""
        self.watch = watch
        self.server = server
        self.run_id = run_id
        self.world_size = world_size
        self.collective_timeout = collective_timeout
        self.dog = dog
        self.budget = budget
        self.chaos_for_rank = chaos_for_rank
        self.say = on_event
        self.members: list[str] = []
        self.number = 0
        # Namespaces (and staging sessions) of this coordinator never collide with a dead one's.
        self.token = uuid.uuid4().hex[:8]
        self.rendezvous = None
        self.failures: list[RankFailure] = []
        self.out_of_service: set[str] = set()

    # -- membership ---------------------------------------------------------------------------

    def _alive(self) -> list[str]:
        try:
            workers = self.watch.workers()
        except Exception:  # noqa: BLE001 - the supervisor's scheduler checks report it
            return []
        quarantined = {q["worker"] for q in self.watch.quarantined}
        return sorted(w for w in workers
                      if w not in quarantined and w not in self.out_of_service)

    def release(self) -> None:
        """Ask every worker to leave its process group (a blocked gloo group slows shutdown)."""
        from tasks.rank_cache import leave_group

        try:
            self.watch.client.run(leave_group)
        except Exception:  # noqa: BLE001 - a worker that cannot answer is closed anyway
            pass

    def roles(self) -> dict[str, str]:
        """Worker -> the role it holds now ("replica R rank K"); spares are not listed."""
        n = self.world_size
        return {w: f"replica {i // n} rank {i % n}" for i, w in enumerate(self.members)}

    def spares(self) -> list[str]:
        """Workers that hold no rank now."""
        return [w for w in self._alive() if w not in self.members]

    def _form(self) -> None:
        deadline = time.monotonic() + self.dog.no_worker_timeout.total_seconds()
        while True:
            alive = self._alive()
            keep = [w if w in alive else None for w in self.members] or [None] * self.total
            free = [w for w in alive if w not in keep]
            free.sort(key=lambda w: w not in self.prefer)
            if keep.count(None) <= len(free):
                break
            if time.monotonic() > deadline:
                shape = f"--workers {self.world_size}" + \
                    (f" --replicas {self.replicas}" if self.replicas > 1 else "")
                raise InfrastructureError(
                    f"{shape} needs {self.total} Dask workers, found "
                    f"{len(alive)} for {self.dog.no_worker_timeout.total_seconds():.0f} s")
            time.sleep(0.2)
        members = [w if w is not None else free.pop(0) for w in keep]
        if members != self.members or self.rendezvous is None:
            self.members = members
            self.number += 1
            self.rendezvous = self.server.rendezvous(
                f"{self.token}-m{self.number}", self.total, self.collective_timeout)

    # -- one group ----------------------------------------------------------------------------

    def _job(self, job: GroupJob, slot: int, trusted: tuple[int, str] | None,
             newest: int) -> RankJob:
        replica, rank = divmod(slot, self.world_size)
        return RankJob(job, rank, self.world_size, self.rendezvous.to_dict(),
                       self.chaos_for_rank(replica, rank, job.first_step, job.last_step),
                       replica=replica, replicas=self.replicas, policy=self.policy,
                       vote_every=self.vote_every, trusted=trusted, newest_step=newest,
                       peers=tuple(self.holders))

    def _newest_step(self, job: GroupJob) -> int:
        """The newest committed checkpoint <= the group's end (its manifest and files checked,
        no chunk read): the flow hands it to every rank, so all start from the same answer."""
        ref = open_store(job.run.store_url).latest_committed_ref(job.run.run_id)
        return ref.step if ref is not None and ref.step <= job.last_step else -1

    def run(self, job: GroupJob, submit: Callable[[RankJob, str], Any],
            mark_crashed: Callable[[Any, str], None]) -> dict[str, Any]:
        """Train the group on the ranks; re-form and resubmit after failures, up to budget.

        Returns the group's result in the shape of `tasks.jobs.GroupResult.to_dict()`.
        """
        tries = 0
        pending: list[RankFailure] = []
        trusted: tuple[int, str] | None = None
        while True:
            self._form()
            newest = self._newest_step(job)
            futures = {slot: submit(self._job(job, slot, trusted, newest), self.members[slot])
                       for slot in range(self.total)}
            attempt = self._wait(futures, mark_crashed)
            if attempt.winner is not None:
                n = self.world_size
                lead = attempt.winner * n
                result = self._combine({r: attempt.results[lead + r] for r in range(n)},
                                       attempt.results)
                # Whose memory holds the group's end: the next group's preferred peers.
                self.holders = [lead + r for r in range(n)]
                for failure in pending:
                    failure.restored_from = failure.restored_from or result["restored_from"]
                    failure.recovered_unix = result["first_step_unix"] or time.time()
                    failure.checkpoint_loads = result["checkpoint_loads"]
                    failure.lost_steps = max(0, failure.step - result["start_step"])
                    if result["restored_from"] in ("peer", "warm"):
                        failure.lost_steps = min(failure.lost_steps, 1)
                    if failure.kind == "sdc":
                        failure.lost_steps = 0  # the trusted replica's state went on
                    self.failures.append(failure)
                if attempt.failed_replicas:
                    # Policy first: the group's result came from a replica that kept all its
                    # ranks; the broken replica cost nothing and is rebuilt before the next
                    # group (a spare, state copied from a live replica's memory).
                    for failure in self._diagnose(attempt):
                        failure.lost_steps, failure.restored_from = 0, "replica"
                        failure.recovered_unix = time.time()
                        self.failures.append(failure)
                        self.say(f"replica lost a rank: {failure.kind} at step {failure.step} "
                                 f"on {failure.worker}; the group's result came from replica "
                                 f"{attempt.winner}")
                    self._take_out(attempt)
                    self.rendezvous = None
                self.prefer = []
                return result
            for err in attempt.errors.values():
                # No re-forming helps a full disk or a configuration error: the run fails.
                if isinstance(err, FatalStoreError | ValueError | TypeError) and \
                        not isinstance(err, WorkerUnhealthy):
                    raise err
            disagreement = next((e for e in attempt.errors.values()
                                 if isinstance(e, ReplicasDisagree)), None)
            if disagreement is not None and not attempt.lost_workers:
                found, trusted = self._settle(disagreement, job, submit)
            else:
                found = self._diagnose(attempt)
            pending.extend(found)
            failure = found[0]
            self.rendezvous = None  # a failed membership is rebuilt, never joined again
            for f in found:
                self.say(f"rank lost: {f.kind} at step {f.step} on {f.worker}: {f.reason}; "
                         "re-forming the group")
                if f.worker and f.kind == "task-error" and \
                        hasattr(self.watch, "count_failure") and \
                        self.watch.count_failure(f.worker, f.kind):
                    self.out_of_service.add(f.worker)
            self._take_out(attempt)
            tries += 1
            if tries > self.budget:
                self.failures.extend(pending)
                raise InfrastructureError(
                    f"steps {job.first_step}-{job.last_step}: the group failed {tries} times; "
                    f"last: {failure.kind}: {failure.reason}")
            self.watch.touch()

    def _take_out(self, attempt: _Attempt) -> None:
        for worker, why in attempt.lost_workers.items():
            if why == "hung":
                # Killed and restarted through its nanny, off the recovery's path: the
                # group re-forms on the spares meanwhile.
                threading.Thread(target=self.watch.restart_worker, args=(worker,),
                                 daemon=True).start()
            self.out_of_service.add(worker)

    def _drop(self, attempt: _Attempt, slot: int, now: float) -> None:
        """A rank of this slot's replica failed: the replica is out of this attempt."""
        attempt.first_failure_unix = attempt.first_failure_unix or now
        replica = slot // self.world_size
        if replica in attempt.failed_replicas:
            return
        attempt.failed_replicas[replica] = now
        if self.replicas > 1 and self.rendezvous is not None:
            try:
                # Live replicas stop waiting for it at votes and for its commits.
                self.server.post(self.rendezvous.namespace, f"dropped/{replica}", "lost")
            except Exception:  # noqa: BLE001 - the ranks' own timeouts bound their waits
                pass

    def _wait(self, futures: dict[int, Any], mark_crashed: Callable[[Any, str], None]) -> _Attempt:
        attempt = _Attempt()
        losses_seen = len(self.watch.losses)
        open_ranks = set(futures)
        n = self.world_size
        done_unix: float | None = None
        self.watch.touch()
        while open_ranks:
            time.sleep(self.dog.poll.total_seconds())
            if not self.watch.scheduler_reachable():
                self.watch.ensure_scheduler(self.dog.scheduler_timeout, "a data-parallel group")
            now = time.time()
            for rank in sorted(open_ranks):
                if futures[rank].wrapped_future.status not in ("finished", "error", "cancelled"):
                    continue
                open_ranks.discard(rank)
                try:
                    # A Prefect task that raised is a finished Dask future holding a Failed
                    # state: the rank's own exception comes out of result().
                    attempt.results[rank] = futures[rank].result(timeout=30)
                    continue
                except PeerLost as err:
                    attempt.peer_lost[rank] = err
                except Exception as err:  # noqa: BLE001 - classified by _diagnose
                    attempt.errors[rank] = err
                self._drop(attempt, rank, now)
            # A member's worker removed by the scheduler: its rank will never report.
            for loss in self.watch.losses[losses_seen:]:
                for rank in sorted(open_ranks):
                    if self.members[rank] == loss.worker:
                        attempt.lost_workers[loss.worker] = "killed"
                        attempt.failed_unix = loss.last_seen_unix or loss.removed_unix
                        open_ranks.discard(rank)
                        self._drop(attempt, rank, now)
            losses_seen = len(self.watch.losses)
            # Peers gave up on a collective while this rank stays silent: it hangs. Only a
            # rank of a replica that failed can be waiting on a dead peer.
            for replica, since in list(attempt.failed_replicas.items()):
                if now - since <= HANG_GRACE.total_seconds():
                    continue
                slots = [s for s in open_ranks if s // n == replica]
                if slots and any(s // n == replica for s in attempt.peer_lost):
                    for rank in slots:
                        attempt.lost_workers[self.members[rank]] = "hung"
                        open_ranks.discard(rank)
            if self.watch.silence_s() > self.dog.hang_timeout.total_seconds() and open_ranks:
                for rank in sorted(open_ranks):
                    attempt.lost_workers[self.members[rank]] = "hung"
                    open_ranks.discard(rank)
                    self._drop(attempt, rank, now)
            if attempt.winner is None:
                attempt.winner = next(
                    (q for q in range(self.replicas) if q not in attempt.failed_replicas
                     and all(q * n + r in attempt.results for r in range(n))), None)
                done_unix = now if attempt.winner is not None else None
            if attempt.winner is not None and done_unix is not None and \
                    now - done_unix > LAG_GRACE.total_seconds():
                break
        for rank, fut in futures.items():
            if rank not in attempt.results and (rank not in open_ranks or
                                                rank // n in attempt.failed_replicas):
                fut.wrapped_future.cancel()
                try:
                    mark_crashed(fut.task_run_id, "data-parallel group re-formed")
                except Exception:  # noqa: BLE001 - the UI fix is best-effort
                    pass
        return attempt

    def _settle(self, err: ReplicasDisagree, job: GroupJob, submit: Callable[[RankJob, str], Any]
                ) -> tuple[list[RankFailure], tuple[int, str]]:
        """Silent data corruption: find the trusted state hash (the majority, or with two
        replicas a third opinion recomputed on spares), quarantine the dissenting workers."""
        detected = time.time()
        votes = err.hashes
        good, count = Counter(votes.values()).most_common(1)[0]
        how = f"majority of {len(votes)} votes"
        if count * 2 <= len(votes):
            third, spares = self._third_opinion(job, err.step, submit)
            if third not in votes.values():
                raise InfrastructureError(
                    f"replicas disagree at step {err.step} and the third opinion on {spares} "
                    f"({third}) matches none of them: {votes}")
            good, how = third, f"third opinion recomputed on {', '.join(spares)}"
            self.prefer = spares
        failures = []
        n = self.world_size
        # The replicas whose every rank held the trusted state: their memory (possibly a few
        # steps past the disputed one: votes between checkpoints do not wait) is the source.
        self.holders = []
        for replica in range(self.replicas):
            mine = {int(k.split(".")[1]): h for k, h in votes.items()
                    if int(k.split(".")[0]) == replica}
            bad = {r: h for r, h in mine.items() if h != good}
            if not bad:
                if len(mine) == n:
                    self.holders += [replica * n + r for r in range(n)]
                continue
            common, times = Counter(mine.values()).most_common(1)[0]
            # A rank whose state differs from its own replica's peers is the one that went
            # wrong; when they all agree (the error spread through the gradients) none can
            # be told apart and all are retired.
            odd = [r for r, h in bad.items() if h != common] if times * 2 > len(mine) else []
            for rank in odd or sorted(bad):
                worker = self.members[replica * n + rank]
                reason = (f"state hash {bad[rank]} != trusted {good} at step {err.step} "
                          f"(replica {replica} rank {rank}; settled by {how})")
                self._quarantine(worker, f"silent data corruption: {reason}")
                failures.append(RankFailure("sdc", err.step, worker, detected, time.time(),
                                            reason=reason, restored_from="peer",
                                            hashes={"trusted": good, "dissent": bad[rank]}))
        return failures, (err.step, good)

    def _quarantine(self, worker: str, reason: str) -> None:
        try:
            self.watch.quarantine(worker, reason)
        except TypeError:  # a watch without reasons
            self.watch.quarantine(worker)
        self.out_of_service.add(worker)

    def _third_opinion(self, job: GroupJob, step: int, submit: Callable[[RankJob, str], Any]
                       ) -> tuple[str, list[str]]:
        """Recompute the disputed stretch on spares: from the newest checkpoint (committed only
        after a vote agreed) to `step`; returns the state hash there and the spares used."""
        n = self.world_size
        deadline = time.monotonic() + self.dog.no_worker_timeout.total_seconds()
        while len(spares := self.spares()) < n:
            if time.monotonic() > deadline:
                raise InfrastructureError(
                    f"replicas disagree at step {step}: a third opinion needs {n} spare "
                    f"worker(s), found {len(spares)} (--spares)")
            time.sleep(0.2)
        spares = spares[:n]
        self.number += 1
        rdv = self.server.rendezvous(f"{self.token}-t{self.number}", n, self.collective_timeout)
        self.say(f"replicas disagree at step {step}: recomputing it on {', '.join(spares)} "
                 "for a third opinion")
        futures = [submit(RankJob(job, r, n, rdv.to_dict(), recompute_to=step), spares[r])
                   for r in range(n)]
        hashes = [f.result(timeout=THIRD_OPINION_TIMEOUT.total_seconds())["state_hash"]
                  for f in futures]
        if len(set(hashes)) != 1:
            raise InfrastructureError(f"the third opinion's own ranks disagree at step {step}")
        return hashes[0], spares

    def _diagnose(self, attempt: _Attempt) -> list[RankFailure]:
        """One failure per lost worker (or the task error that broke the group)."""
        detected = attempt.first_failure_unix or time.time()
        step = max([p.step + 1 for p in attempt.peer_lost.values()] or [0])
        failures = []
        for worker, why in attempt.lost_workers.items():
            if why == "hung":
                # Measured: from the hung rank's last sign of life (its last progress event)
                # to the survivors' collective giving up on it.
                failed = self.watch.last_seen.get(worker) or detected
                failures.append(RankFailure("hang", step, worker, failed, detected, reason=why))
            else:
                failed = attempt.failed_unix or detected
                # No peer reported the step (a replica of one rank): the worker's own last
                # progress event says which step was in flight.
                at = step or self.watch.last_step.get(worker, -1) + 1
                failures.append(RankFailure("worker-lost", at, worker, failed, detected,
                                            reason=why))
        if failures:
            return failures
        for rank, err in attempt.errors.items():
            if isinstance(err, WorkerUnhealthy):
                # Redundancy: the worker is retired for good; a spare takes its rank.
                self._quarantine(self.members[rank], err.reason)
                return [RankFailure("quarantine", step, self.members[rank], detected, detected,
                                    reason=err.reason)]
            kind = "sdc" if isinstance(err, RanksDisagree) else "task-error"
            if isinstance(err, RanksDisagree):
                step = err.step
            return [RankFailure(kind, step, self.members[rank], detected, detected,
                                reason=f"{type(err).__name__}: {str(err).splitlines()[0]}")]
        return [RankFailure("task-error", step, None, detected, detected, reason="peer lost")]

    @staticmethod
    def _combine(results: dict[int, dict[str, Any]],
                 every: dict[int, dict[str, Any]]) -> dict[str, Any]:
        """The group's result from one replica's ranks (`results`, by rank); `every` rank's
        result that arrived (all replicas) for the per-rank table and the checkpoints."""
        lead = results[0]
        ranks = [results[r] for r in sorted(results)]
        arrived = [every[s] for s in sorted(every)]
        return {
            "ref": lead["ref"], "step": lead["step"], "worker": lead["worker"],
            "reused": all(r["reused"] for r in ranks),
            "restored_from": lead["restored_from"], "start_step": lead["start_step"],
            "first_step_unix": min((r["first_step_unix"] for r in ranks
                                    if r["first_step_unix"]), default=None),
            "checkpoints": sorted({c for r in arrived for c in r["checkpoints"]}),
            "losses": lead["losses"],
            "steps_trained": lead["steps_trained"],
            "tokens": sum(r["tokens"] for r in ranks),
            "train_s": max(r["train_s"] for r in ranks),
            "ckpt_s": max(r["ckpt_s"] for r in ranks),
            "checkpoint_loads": sum(r["checkpoint_loads"] for r in ranks),
            "corrupt": [c for r in ranks for c in r["corrupt"]],
            "vote_s": max((r["vote_s"] for r in arrived), default=0.0),
            "votes": max((r["votes"] for r in arrived), default=0),
            "vote_wait_s": max((r["vote_wait_s"] for r in arrived), default=0.0),
            "background_saves": lead.get("background_saves", 0),
            "background_stall_s": max(r.get("background_stall_s", 0.0) for r in ranks),
            "background_drag_s": max(r.get("background_drag_s", 0.0) for r in ranks),
            "background_overlap_steps": max(r.get("background_overlap_steps", 0) for r in ranks),
            "train_loss": lead["train_loss"], "stopped_early": False,
            "attempt": lead.get("attempt"),
            "ranks": [{"rank": r["rank"], "replica": r["replica"], "worker": r["worker"],
                       "pid": r["pid"],
                       "tokens": r["tokens"], "train_s": r["train_s"], "cpu_s": r["cpu_s"],
                       "window_unix": r["window_unix"], "restored_from": r["restored_from"],
                       "checkpoint_loads": r["checkpoint_loads"],
                       "bytes_reused": r["bytes_reused"]} for r in arrived],
        }


def rendezvous_host(scheduler_address: str) -> str:
    """The address of this machine that the cluster reaches: the one it uses to reach the
    scheduler (127.0.0.1 for a local cluster)."""
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(scheduler_address if "://" in scheduler_address
                      else f"tcp://{scheduler_address}")
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 8786
    if host in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect((host, port))  # no packet is sent: this only picks the route
        return str(probe.getsockname()[0])
