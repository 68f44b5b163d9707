"""Data-parallel training in pure torch.distributed: real processes, gloo over 127.0.0.1."""

from __future__ import annotations

import multiprocessing as mp
import queue
from datetime import timedelta
from itertools import count

import dp_ranks
import pytest

from storage.hashing import state_hash
from training.distributed import RendezvousServer, batch_share
from training.loop import Trainer

_namespaces = count()


@pytest.fixture(scope="module")
def server():
    srv = RendezvousServer("127.0.0.1", 0)
    yield srv
    srv.close()


def _run(server: RendezvousServer, folder: str, plans: list[dict], timeout_s: float = 20.0,
         expect: int | None = None) -> list[dict]:
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    rdv = server.rendezvous(f"test/{next(_namespaces)}", len(plans),
                            timedelta(seconds=timeout_s)).to_dict()
    procs = [ctx.Process(target=dp_ranks.run_rank, args=(rdv, rank, folder, plan, out))
             for rank, plan in enumerate(plans)]
    for p in procs:
        p.start()
    results = []
    try:
        for _ in range(expect if expect is not None else len(plans)):
            results.append(out.get(timeout=120))
    except queue.Empty:
        pytest.fail(f"ranks returned {len(results)} results")
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
                p.join()
    return sorted(results, key=lambda r: r["rank"])


def test_two_ranks_stay_identical_and_match_the_full_batch(server, tmp_path):
    a = _run(server, str(tmp_path), [{"steps": 6}, {"steps": 6}])
    assert a[0]["hash"] == a[1]["hash"]
    assert a[0]["gathered"] == [a[0]["hash"], a[1]["hash"]]
    assert [r["rank"] for r in a[1]["receipts"]] == [0, 1]  # any size, in rank order
    assert len(a[0]["receipts"][1]["pad"]) == 300
    assert a[0]["from_last"] == a[1]["from_last"] == {"chosen": 1}
    assert a[0]["losses"] == a[1]["losses"]  # the global mean, the same bits on both ranks
    b = _run(server, str(tmp_path), [{"steps": 6}, {"steps": 6}])
    assert b[0]["hash"] == a[0]["hash"]  # deterministic for the same N

    # Equal shares of the batch, gradients averaged: the same update as one process taking the
    # whole batch, up to float summation order.
    alone = Trainer(dp_ranks.tiny_cfg(), dp_ranks.short_corpus(str(tmp_path)))
    losses = [alone.train_step().loss for _ in range(6)]
    assert losses == pytest.approx(a[0]["losses"], rel=1e-4)
    assert state_hash(alone.capture()[0]) != a[0]["hash"]  # not by accident the same bits


def test_a_replacement_receives_the_survivors_state(server, tmp_path):
    straight = _run(server, str(tmp_path), [{"steps": 7}, {"steps": 7}])
    healed = _run(server, str(tmp_path), [{"steps": 7, "forget_at": 4},
                                          {"steps": 7, "forget_at": 4}])
    assert healed[1]["fresh_hash"] != healed[0]["hash_at_4"]
    assert healed[1]["hash_after_broadcast"] == healed[0]["hash_at_4"]
    assert healed[0]["hash"] == healed[1]["hash"] == straight[0]["hash"]


def test_a_peer_killed_mid_group_leaves_the_survivor_at_its_last_step(server, tmp_path):
    [survivor] = _run(server, str(tmp_path), [{"steps": 9, "die_after": 3},
                                              {"steps": 9, "die_after": 3}],
                      timeout_s=10.0, expect=1)
    assert survivor["rank"] == 0
    assert survivor["error"] and "all_reduce failed" in survivor["error"]
    assert survivor["failed_after_s"] < 10.0
    assert survivor["step_after_failure"] == 3
    assert survivor["hash_after_failure"] == survivor["hash_before_failed_step"]


def test_a_batch_the_ranks_cannot_share_is_refused():
    assert batch_share(8, 2) == 4
    with pytest.raises(ValueError, match="cannot be split into 3 equal shares"):
        batch_share(8, 3)
