"""Rank tasks without Prefect or Dask around them: real processes standing in for workers, real
gloo, a real store. What the flow relies on: warm reuse, peer restore, sharded commits."""

from __future__ import annotations

import multiprocessing as mp
from datetime import timedelta
from pathlib import Path

import dp_ranks
import pytest

from storage import open_store
from training.distributed import RendezvousServer


class Workers:
    """Worker-like processes, each serving rank jobs in order; stopped by PID at the end."""

    def __init__(self, folder: Path, store: Path) -> None:
        self.ctx = mp.get_context("spawn")
        self.out = self.ctx.Queue()
        self.folder, self.store = str(folder), str(store)
        self.procs: dict[str, tuple[mp.Process, mp.Queue]] = {}

    def start(self, name: str) -> None:
        jobs = self.ctx.Queue()
        p = self.ctx.Process(target=dp_ranks.serve_jobs,
                             args=(self.folder, self.store, jobs, self.out))
        p.start()
        self.procs[name] = (p, jobs)

    def submit(self, name: str, rdv: dict, rank: int, first: int, last: int,
               chaos: tuple = ()) -> None:
        self.procs[name][1].put((rdv, rank, first, last, chaos))

    def collect(self, n: int) -> dict[int, tuple[str, dict]]:
        got = {}
        for _ in range(n):
            status, rank, data = self.out.get(timeout=180)
            got[rank] = (status, data)
        return got

    def stop(self) -> None:
        for p, jobs in self.procs.values():
            if p.is_alive():
                jobs.put(None)
                p.join(timeout=20)
            if p.is_alive():
                p.kill()
                p.join()


@pytest.fixture
def server():
    srv = RendezvousServer("127.0.0.1", 0)
    yield srv
    srv.close()


def _rdv(server: RendezvousServer, name: str) -> dict:
    return server.rendezvous(name, 2, timedelta(seconds=15)).to_dict()


def test_groups_reuse_warm_state_and_a_lost_rank_is_healed_from_its_peer(server, tmp_path):
    straight = Workers(tmp_path, tmp_path / "straight")
    healed = Workers(tmp_path, tmp_path / "healed")
    try:
        for name in ("a", "b"):
            straight.start(name)
        rdv = _rdv(server, "s-m1")
        for first, last in ((0, 10), (10, 20)):
            straight.submit("a", rdv, 0, first, last)
            straight.submit("b", rdv, 1, first, last)
            got = straight.collect(2)
            assert {s for s, _ in got.values()} == {"ok"}
        assert got[0][1]["restored_from"] == "warm"  # the second group went on from memory
        assert got[0][1]["checkpoint_loads"] == 0
        want = got[0][1]["state_hash"]
        assert got[1][1]["state_hash"] == want

        for name in ("a", "b", "spare"):
            healed.start(name)
        rdv = _rdv(server, "h-m1")
        healed.submit("a", rdv, 0, 0, 10)
        healed.submit("b", rdv, 1, 0, 10)
        assert {s for s, _ in healed.collect(2).values()} == {"ok"}
        # Rank 1's process dies as it starts step 13: rank 0 keeps step 12 in memory.
        healed.submit("a", rdv, 0, 10, 20)
        healed.submit("b", rdv, 1, 10, 20, (("kill-worker", 13),))
        [(status, data)] = healed.collect(1).values()
        assert status == "peer-lost" and data["step"] == 12
        store = open_store(str(tmp_path / "healed"))
        assert store.steps("dp") == [5, 10]  # nothing of the broken group committed
        rdv = _rdv(server, "h-m2")
        healed.submit("a", rdv, 0, 10, 20)
        healed.submit("spare", rdv, 1, 10, 20)
        got = healed.collect(2)
        assert {s for s, _ in got.values()} == {"ok"}, got
        for rank in (0, 1):
            assert got[rank][1]["restored_from"] == "peer"
            assert got[rank][1]["start_step"] == 12  # one step lost: the one in flight
            assert got[rank][1]["checkpoint_loads"] == 0  # the store was not read
            assert got[rank][1]["state_hash"] == want  # bit-exact with the unbroken run
        assert store.steps("dp") == [5, 10, 15, 20]
        assert all(store.verify("dp", s).ok for s in store.steps("dp"))
    finally:
        straight.stop()
        healed.stop()


def test_no_live_state_means_the_newest_checkpoint(server, tmp_path):
    first, second = Workers(tmp_path, tmp_path / "s"), None
    try:
        first.start("a")
        first.start("b")
        rdv = _rdv(server, "c-m1")
        first.submit("a", rdv, 0, 0, 10)
        first.submit("b", rdv, 1, 0, 10)
        want = first.collect(2)[0][1]
        first.stop()
        # New processes: nobody holds state, so both ranks read step 10 from the store.
        second = Workers(tmp_path, tmp_path / "s")
        second.start("c")
        second.start("d")
        rdv = _rdv(server, "c-m2")
        second.submit("c", rdv, 0, 10, 15)
        second.submit("d", rdv, 1, 10, 15)
        got = second.collect(2)
        assert all(got[r][1]["restored_from"] == "checkpoint" for r in (0, 1)), got
        assert all(got[r][1]["checkpoint_loads"] == 1 for r in (0, 1))
        assert want["step"] == 10 and got[0][1]["step"] == 15
    finally:
        first.stop()
        if second is not None:
            second.stop()
