"""One coordinator at a time (issue 9, DESIGN.md section 8 "Lease").

On a real store: acquire, renew, expiry and takeover epochs; racing takers (exactly one wins);
fenced commits with a stale or expired epoch refused, unfenced ones unchanged. End to end with
the real CLI: a second coordinator exits 2 while the first lives, a new one takes over after the
first is SIGKILLed and its lease expired and ends bit-exact; a coordinator paused (SIGSTOP) past
its lease commits nothing after the expiry and fails with "lease lost" once it wakes.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from storage_helpers import SMALL_CHUNK, numpy_state

from storage import CheckpointNotFoundError, lease, open_store
from storage.claims import _proc_start
from storage.lease import Lease, LeaseHeld, LeaseLostError, this_holder
from storage.store import CheckpointStore
from tests.cli_helpers import (
    cli_args,
    committed_steps,
    kill_group,
    read_summary,
    run_cli,
    start_cli,
    tree_state,
)

RUN = "leased"
SHORT = timedelta(seconds=0.4)


def _wait_until(condition: Any, timeout_s: float, what: str) -> None:
    """Poll a condition of the store or the clock with a deadline."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _expired(store: CheckpointStore, run_id: str) -> bool:
    current = lease.read(store, run_id)
    return current is not None and not current.live()


@pytest.fixture(params=["local", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CheckpointStore]:
    if request.param == "local":
        yield open_store(str(tmp_path / "store"), chunk_bytes=SMALL_CHUNK, durability="none")
        return
    import fsspec

    url = f"memory://lease-{os.getpid()}-{tmp_path.name}"
    yield open_store(url, chunk_bytes=SMALL_CHUNK)
    fsspec.filesystem("memory").rm(url.removeprefix("memory:/"), recursive=True)


# ---- the lease record ----------------------------------------------------------------------
def test_acquire_renew_expire_and_take_over(store: CheckpointStore) -> None:
    a, b = this_holder(), this_holder()
    first = lease.acquire(store, RUN, a, SHORT)
    assert first.epoch == 1 and first.holder == a and lease.read(store, RUN) == first
    with pytest.raises(LeaseHeld) as held:
        lease.acquire(store, RUN, b, SHORT)
    line = str(held.value)
    assert line.startswith(f"run {RUN} is held by {a.host}:{a.pid} (coordinator {a.token[:8]})")
    assert " UTC (in " in line and "lease epoch 1" in line and "\n" not in line

    renewed = lease.renew(store, first)
    assert renewed.epoch == 1 and renewed.expires_unix > first.expires_unix
    _wait_until(lambda: _expired(store, RUN), 5, "the lease to expire")
    # Renewing after its own expiry fails for good, even though nobody took the run over yet.
    with pytest.raises(LeaseLostError, match="not renewed in time"):
        lease.renew(store, renewed)

    second = lease.acquire(store, RUN, b, SHORT)
    assert second.epoch == 2 and lease.read(store, RUN) == second
    # The old holder, even with an unexpired view of its own lease, finds the takeover.
    with pytest.raises(LeaseLostError, match="epoch 1 is stale") as lost:
        lease.renew(store, dataclasses.replace(renewed, expires_unix=time.time() + 60))
    assert isinstance(lost.value, LeaseLostError) and str(b.token[:8]) in str(lost.value)

    # Released: the next coordinator takes over at once, with the next epoch.
    lease.release(store, second)
    assert not lease.read(store, RUN).live()
    assert lease.acquire(store, RUN, this_holder(), SHORT).epoch == 3


def test_a_dead_holder_on_this_host_holds_nothing(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"), durability="none")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead = dataclasses.replace(this_holder(), pid=int(gone.stdout), pid_start="0")
    assert dead.is_dead() and not this_holder().is_dead()
    lease.acquire(store, RUN, dead, timedelta(minutes=5))
    assert lease.acquire(store, RUN, this_holder(), SHORT).epoch == 2


def test_fresh_keeps_the_lease_and_its_epochs(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "store"), chunk_bytes=SMALL_CHUNK, durability="none")
    mine = lease.acquire(store, RUN, this_holder(), timedelta(minutes=5))
    store.save(RUN, 1, numpy_state(1), {"step": 1}, lease_epoch=mine.epoch)
    store.write_json(RUN, "run", {"x": 1})
    store.delete_run(RUN)  # --fresh
    assert store.runs() == [] and store.read_json(RUN, "run") is None
    assert lease.read(store, RUN) == mine
    store.save(RUN, 2, numpy_state(2), {"step": 2}, lease_epoch=mine.epoch)
    assert store.steps(RUN) == [2]


@pytest.mark.parametrize("takers", [2, 4])
def test_racing_takers_of_an_expired_lease_exactly_one_wins(store: CheckpointStore,
                                                            takers: int) -> None:
    current = lease.acquire(store, RUN, this_holder(), timedelta(minutes=5))
    for _ in range(8):
        lease.release(store, current)  # expired: anyone may take it
        won, refused = _race(store, takers)
        assert len(won) == 1 and len(refused) == takers - 1, (won, refused)
        assert won[0].epoch == current.epoch + 1
        assert lease.read(store, RUN) == won[0]
        assert all(err.lease.holder == won[0].holder for err in refused)
        current = won[0]


def _race(store: CheckpointStore, takers: int) -> tuple[list[Lease], list[LeaseHeld]]:
    """`takers` threads, each a coordinator of its own, acquire the lease at the same moment."""
    barrier = threading.Barrier(takers)
    won: list[Lease] = []
    refused: list[LeaseHeld] = []

    def take() -> None:
        holder = this_holder()
        barrier.wait()
        try:
            won.append(lease.acquire(store, RUN, holder, timedelta(minutes=5)))
        except LeaseHeld as err:
            refused.append(err)

    threads = [threading.Thread(target=take) for _ in range(takers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return won, refused


# ---- fencing ---------------------------------------------------------------------------------
def test_stale_or_expired_epoch_cannot_commit_unfenced_can(store: CheckpointStore) -> None:
    old = lease.acquire(store, RUN, this_holder(), SHORT)
    store.save(RUN, 1, numpy_state(1), {"step": 1}, lease_epoch=old.epoch)  # live: commits
    _wait_until(lambda: _expired(store, RUN), 5, "the lease to expire")
    with pytest.raises(LeaseLostError, match="epoch 1 expired"):
        store.save(RUN, 2, numpy_state(2), {"step": 2}, lease_epoch=old.epoch)
    new = lease.acquire(store, RUN, this_holder(), timedelta(minutes=5))
    with pytest.raises(LeaseLostError, match="epoch 1 is stale") as refused:
        store.save(RUN, 2, numpy_state(2), {"step": 2}, lease_epoch=old.epoch)
    assert refused.value.errno_name == "LEASE_LOST" and "\n" not in str(refused.value)
    # Nothing of the refused commits is visible, and a reader finds no step 2.
    assert store.steps(RUN) == [1]
    with pytest.raises(CheckpointNotFoundError):
        store.verify(RUN, 2)

    # Sharded commits are fenced the same way; the shares stay for whoever may commit them.
    state = numpy_state(3)
    receipts = [store.write_share(RUN, 3, state, session="s", rank=r, world_size=2)
                for r in (0, 1)]
    with pytest.raises(LeaseLostError, match="epoch 1 is stale"):
        store.commit_shares(RUN, 3, receipts, {"step": 3}, session="s", lease_epoch=old.epoch)
    assert store.steps(RUN) == [1]
    store.commit_shares(RUN, 3, receipts, {"step": 3}, session="s", lease_epoch=new.epoch)

    # Without an epoch (tools, storage tests) commits are not fenced at all.
    store.save(RUN, 4, numpy_state(4), {"step": 4})
    assert store.steps(RUN) == [1, 3, 4]
    assert all(store.verify(RUN, s).ok for s in (1, 3, 4))


def test_lease_errors_cross_process_boundaries() -> None:
    import pickle

    held = LeaseHeld(Lease(RUN, this_holder(), 3, time.time(), time.time() + 9, 9.0))
    lost = LeaseLostError(RUN, "epoch 3 is stale", "/x")
    assert str(pickle.loads(pickle.dumps(held))) == str(held)
    again = pickle.loads(pickle.dumps(lost))
    assert type(again) is LeaseLostError and str(again) == str(lost)
    assert str(lost).startswith(f"lease lost on run {RUN}: ")


# ---- the coordinator's keeper ---------------------------------------------------------------
def test_keeper_renews_then_a_renewal_past_expiry_loses_it_for_good(tmp_path: Path) -> None:
    from flows.lease_keeper import LeaseKeeper

    store = open_store(str(tmp_path / "store"), durability="none")
    keeper = LeaseKeeper(store, RUN, SHORT)
    try:
        first = lease.read(store, RUN)
        _wait_until(lambda: time.time() > first.expires_unix + SHORT.total_seconds(), 5,
                    "two TTLs")
        assert keeper.lost() is None and lease.read(store, RUN).live()  # renewed all along
        with pytest.raises(LeaseHeld):
            lease.acquire(store, RUN, this_holder(), SHORT)
        # A pause: the keeper's next renewal is held up (it waits for the record's lock)
        # until its lease has expired.
        with store.backend.step_lock(f"{RUN}/{lease.LEASE_DIR}/record.json"):
            stuck = lease.read(store, RUN)
            _wait_until(lambda: not stuck.live(), 5, "the expiry")
            time.sleep(SHORT.total_seconds() / 2)  # the keeper's renewal is due meanwhile
        _wait_until(lambda: keeper.lost() is not None, 5, "the keeper to see its loss")
        assert "not renewed in time" in str(keeper.lost())
        time.sleep(SHORT.total_seconds())  # a few more periods: no renewal ever again
        assert lease.read(store, RUN) == stuck
    finally:
        keeper.close()
    assert lease.read(store, RUN) == stuck  # a lost lease is not released either


def test_flow_lease_uses_this_process_lease_or_takes_its_own(tmp_path: Path) -> None:
    from flows.lease_keeper import flow_lease

    store = open_store(str(tmp_path / "store"), durability="none")
    url = str(tmp_path / "store")
    # No lease yet (a deployment run): the flow takes one, and releases it at its end.
    with flow_lease(url, RUN, SHORT) as held:
        assert held.epoch == 1 and held.lost() is None
        assert lease.read(store, RUN).holder.is_this_process()
    assert not lease.read(store, RUN).live()
    # Held by this process (the CLI's keeper): the flow runs under it and leaves it alone.
    cli = lease.acquire(store, RUN, this_holder(), timedelta(minutes=5))
    with flow_lease(url, RUN, SHORT) as held:
        assert held.epoch == cli.epoch == 2 and held.lost() is None
    assert lease.read(store, RUN) == cli
    # Not renewed (the CLI's keeper was paused while the cluster started): the flow sees it.
    lease.release(store, cli)
    cli = lease.acquire(store, RUN, this_holder(), SHORT)
    with flow_lease(url, RUN, SHORT) as held:
        _wait_until(lambda: held.lost() is not None, 5, "the unrenewed lease to expire")
        assert "expired" in str(held.lost())
    # A live holder elsewhere that stops renewing: a flow waits for its expiry, then takes over.
    parent = dataclasses.replace(this_holder(), pid=os.getppid(),
                                 pid_start=_proc_start(os.getppid()))
    assert not parent.is_dead() and not parent.is_this_process()
    theirs = lease.acquire(store, RUN, parent, SHORT)
    with flow_lease(url, RUN, SHORT) as held:
        assert time.time() >= theirs.expires_unix  # waited for it
        assert held.epoch == theirs.epoch + 1 and lease.read(store, RUN).holder.is_this_process()


# ---- two coordinators, real CLI processes ---------------------------------------------------
TTL = "3s"


def _lease_free(store: Path, run_id: str) -> bool:
    return _expired(open_store(str(store)), run_id)


def _outside_lease(root: Path) -> dict[str, tuple[int, int]]:
    """The run's files but its lease (which the live holder keeps renewing)."""
    return {k: v for k, v in tree_state(root).items() if not k.startswith(f"{lease.LEASE_DIR}/")}


@pytest.mark.slow
def test_second_coordinator_refused_then_takeover_after_kill_is_bit_exact(
        reference: dict, tmp_path: Path, corpus: Path) -> None:
    store, run_id = tmp_path / "store", "two-coordinators"
    args = cli_args(store, corpus, run_id, "--lease-ttl", TTL)
    # A stays alive mid-run: its worker hangs before step 23, after committing step 20.
    first = start_cli([*args, "--chaos", "hang@23"])
    try:
        _wait_until(lambda: first.poll() is not None or
                    open_store(str(store)).read_json(run_id, "chaos/hang@23") is not None,
                    120, "the first coordinator to reach step 23")
        assert first.poll() is None, first.stderr.read() if first.stderr else ""
        assert 20 in committed_steps(store, run_id)
        held = lease.read(open_store(str(store)), run_id)
        assert held.holder.pid == first.pid and held.epoch == 1
        before = _outside_lease(store / run_id)

        second = run_cli(args, timeout_s=120)
        lines = [line for line in second.stderr.splitlines() if line.strip()]
        assert second.returncode == 2, second.stderr[-3000:]
        assert len(lines) == 1, second.stderr[-3000:]
        assert lines[0].startswith(f"error: run {run_id} is held by ")
        assert f":{first.pid} (coordinator {held.holder.token[:8]}) until " in lines[0]
        assert "lease epoch 1" in lines[0]
        assert first.poll() is None  # refused while the first one lives
        assert _outside_lease(store / run_id) == before  # the refused one touched nothing
        assert lease.read(open_store(str(store)), run_id).epoch == 1
    finally:
        kill_group(first)  # SIGKILL: the coordinator and its workers, by process group
    # The dead holder's lease runs out (nobody renews it), then a new coordinator takes over.
    _wait_until(lambda: _lease_free(store, run_id), 30, "the killed coordinator's lease to expire")
    summary_path = tmp_path / "third.json"
    third = run_cli([*args, "--summary-json", str(summary_path)])
    assert third.returncode == 0, third.stderr[-3000:]
    s = read_summary(summary_path)
    assert s["status"] == "completed" and s["resumed_from_step"] == 20
    assert s["state_hash"] == reference["state_hash"]
    after = lease.read(open_store(str(store)), run_id)
    assert after.epoch == 2 and not after.live()  # taken over, then released on exit


def _refusals(store: Path, run_id: str) -> list[dict[str, Any]]:
    """Workers' commits refused by the fence, from their attempt records."""
    return [doc["lease_lost"] for _, doc in open_store(str(store)).list_json(run_id, "attempts")
            if doc.get("lease_lost")]


@pytest.mark.slow
def test_coordinator_paused_past_its_lease_cannot_commit(prefect_api: str, tmp_path: Path,
                                                         corpus: Path) -> None:
    store, run_id = tmp_path / "store", "paused"
    summary_path = tmp_path / "paused.json"
    every = 10
    # One long group: the worker keeps training (and trying to commit) while its coordinator
    # is stopped.
    args = cli_args(store, corpus, run_id, "--steps", "1000", "--epoch-steps", "1000",
                    "--group-steps", "1000", "--ckpt-every", str(every), "--lease-ttl", TTL,
                    "--summary-json", str(summary_path))
    proc = start_cli(args)
    try:
        _wait_until(lambda: proc.poll() is not None or committed_steps(store, run_id), 120,
                    "the first checkpoint")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        os.kill(proc.pid, signal.SIGSTOP)  # the coordinator only: its Dask workers run on
        paused = lease.read(open_store(str(store)), run_id)  # nobody renews it from now on
        _wait_until(lambda: time.time() > paused.expires_unix, 30, "the lease's expiry")
        at_expiry = committed_steps(store, run_id)
        _wait_until(lambda: _refusals(store, run_id), 120, "a worker's commit to be refused")
        [refused] = _refusals(store, run_id)
        assert refused["unix"] > paused.expires_unix and "expired" in refused["reason"]
        # Every checkpoint step up to the refusal was committed before the expiry or refused
        # (retention may have removed the oldest ones meanwhile: the newest stay, without gaps).
        assert at_expiry and at_expiry[0] <= refused["step"] - every
        assert at_expiry == list(range(at_expiry[0], refused["step"], every))
        assert committed_steps(store, run_id) == at_expiry
        os.kill(proc.pid, signal.SIGCONT)
        _, err = proc.communicate(timeout=120)
    finally:
        try:
            os.kill(proc.pid, signal.SIGCONT)  # a stopped process ignores SIGKILL's cleanup
        except ProcessLookupError:
            pass
        kill_group(proc)
    assert proc.returncode == 1, err[-3000:]
    [line] = [line for line in err.splitlines() if line.startswith("error: ")]
    assert line.startswith(f"error: run {run_id} failed: lease lost on run {run_id}: "), line
    assert committed_steps(store, run_id) == at_expiry  # nothing committed after the expiry
    s = read_summary(summary_path)
    assert s["status"] == "failed" and s["reason"].startswith("lease lost")
    # Counted by the run, including the oldest ones retention removed since.
    assert s["checkpoints_committed"] == len(range(every, refused["step"], every))
    assert "lease-lost" in [f["kind"] for f in s["failures"]]
