"""Rank 0's wait for every rank's share receipt (tasks/rank_saves.py), on a real TCPStore: it
returns the receipts in rank order, stops at once when its attempt cancels it, and names the
ranks whose receipt never came when the collective timeout passes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch.distributed as dist

from storage import open_store
from tasks.rank_saves import SaveCancelled, await_receipts, receipt_key
from training.rendezvous import CollectiveError, RendezvousServer


@pytest.fixture
def board() -> Iterator[dist.Store]:
    server = RendezvousServer()
    client = dist.TCPStore(server.host, server.port, is_master=False,
                           timeout=timedelta(seconds=10))
    yield dist.PrefixStore("ns/board", client)
    server.close()


def _post_receipts(board: dist.Store, tmp_path: Path, ranks: list[int], world: int = 2) -> None:
    store = open_store(str(tmp_path / "store"))
    tensors = {"w": np.arange(64, dtype=np.float32), "b": np.ones(8, dtype=np.float32)}
    for rank in ranks:
        receipt = store.write_share("r", 5, tensors, session="s", rank=rank, world_size=world)
        board.set(receipt_key(5, rank), receipt.to_json())


def test_the_receipts_come_back_in_rank_order(board: dist.Store, tmp_path: Path) -> None:
    _post_receipts(board, tmp_path, [1, 0])
    got = await_receipts(board, 5, 2, threading.Event(), timedelta(seconds=5))
    assert [r.rank for r in got] == [0, 1]
    ref = open_store(str(tmp_path / "store")).commit_shares("r", 5, got, {}, session="s")
    assert ref.step == 5


def test_a_cancelled_wait_stops_at_once(board: dist.Store, tmp_path: Path) -> None:
    _post_receipts(board, tmp_path, [0])  # rank 1 never posts: its process died
    cancel = threading.Event()
    timer = threading.Timer(0.2, cancel.set)
    timer.start()
    with pytest.raises(SaveCancelled):
        await_receipts(board, 5, 2, cancel, timedelta(seconds=60))
    timer.join()


def test_a_missing_receipt_is_a_lost_peer_after_the_timeout(board: dist.Store,
                                                           tmp_path: Path) -> None:
    _post_receipts(board, tmp_path, [0])
    with pytest.raises(CollectiveError, match="share/5/1"):
        await_receipts(board, 5, 2, threading.Event(), timedelta(seconds=0.3))
