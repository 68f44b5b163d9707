"""Exactly one commit wins, on every backend the store accepts (DESIGN.md §2), and a writer never
deletes or overwrites another writer's commit.

Several writers (threads and processes) save the same step with different states, meeting at a
barrier right before the commit so they really race, for many rounds.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path

import fsspec
import pytest
from storage_helpers import (
    ROOT,
    SMALL_CHUNK,
    assert_same_tensors,
    env_for_child,
    numpy_state,
    race_save,
)

from storage import open_store
from storage.faults import ENV
from storage.hashing import bytes_hash
from storage.store import CheckpointStore

RUN = "race"
WRITERS = 4
ROUNDS = 12


@pytest.fixture
def memory_url() -> Iterator[str]:
    name = f"t{uuid.uuid4().hex}"
    yield f"memory://{name}"
    fs = fsspec.filesystem("memory")
    if fs.exists(name):
        fs.rm(name, recursive=True)


def _url(kind: str, tmp_path: Path, memory_url: str) -> str:
    return {"local": str(tmp_path / "store"), "flaky": f"flaky://{tmp_path / 'store'}", "memory": memory_url}[kind]


def _check_rounds(store: CheckpointStore, results: list[dict], rounds: int) -> None:
    """Per step: one winner, every loser returned the winner's ref, and the step on disk is all
    of the winner's files (its manifest matches its marker, every chunk verifies)."""
    assert store.steps(RUN) == list(range(rounds))
    for step in range(rounds):
        mine = [r for r in results if r["step"] == step]
        assert len(mine) == WRITERS
        assert sorted(r["outcome"] for r in mine) == ["committed"] + ["lost-race"] * (WRITERS - 1), mine
        refs = {json.dumps(r["ref"], sort_keys=True) for r in mine}
        assert len(refs) == 1, mine
        ref = store.ref(RUN, step)
        assert ref.to_dict() == mine[0]["ref"]
        base = f"{RUN}/ckpt/{step:012d}"
        marker = json.loads(store.backend.read_bytes(f"{base}/COMMITTED"))
        assert marker["manifest_hash"] == bytes_hash(store.backend.read_bytes(f"{base}/manifest.json"))
        report = store.verify(RUN, step)
        assert report.ok, report.problems
        ckpt = store.load(RUN, step)
        seed = int(ckpt.tensors["optim/state/0/step"].item())
        assert ckpt.metadata == {"seed": seed, "step": step}
        assert_same_tensors(ckpt.tensors, numpy_state(seed))  # all of one writer, none of another
    leftovers = [n for n in store.backend.list_dir(f"{RUN}/ckpt") if n.startswith(".")]
    assert leftovers == []


@pytest.mark.parametrize("kind", ["local", "flaky", "memory"])
def test_threads_racing_to_commit_one_step_leave_exactly_one_winner(
    kind: str, tmp_path: Path, memory_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REBOUND_FLAKY_P", "0")
    url = _url(kind, tmp_path, memory_url)
    stores = [open_store(url, chunk_bytes=SMALL_CHUNK) for _ in range(WRITERS)]  # own stats each
    results: list[dict] = []
    with ThreadPoolExecutor(WRITERS) as pool:
        for step in range(ROUNDS):
            monkeypatch.setenv(ENV, f"barrier:before-commit:{tmp_path / 'barrier' / str(step)}:{WRITERS}")
            futs = [
                pool.submit(race_save, s, RUN, step, numpy_state(100 + i), {"seed": 100 + i})
                for i, s in enumerate(stores)
            ]
            results += [f.result(timeout=60) for f in futs]
    monkeypatch.delenv(ENV)
    _check_rounds(open_store(url), results, ROUNDS)


@pytest.mark.parametrize("kind", ["local", "flaky"])
def test_processes_racing_to_commit_one_step_leave_exactly_one_winner(kind: str, tmp_path: Path) -> None:
    import subprocess
    import sys

    url = _url(kind, tmp_path, "")
    procs = [
        subprocess.Popen(
            [sys.executable, str(ROOT / "tests" / "storage_helpers.py"), "race", url, RUN, str(ROUNDS),
             str(200 + i), str(tmp_path / "barrier"), str(WRITERS)],
            cwd=ROOT, env=env_for_child(REBOUND_FLAKY_P="0"), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        for i in range(WRITERS)
    ]
    try:
        outs = [p.communicate(timeout=120) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0] * WRITERS, [o[1][-2000:] for o in outs]
    results = [json.loads(line) for out, _ in outs for line in out.splitlines()]
    _check_rounds(open_store(url), results, ROUNDS)


def test_a_dead_claimers_partial_copy_is_replaced_not_trusted(tmp_path: Path, memory_url: str) -> None:
    """A writer that died mid-copy (its claim left behind, its pid gone) does not block the
    step: the next writer takes over, removes the partial folder and commits."""
    store = open_store(memory_url, chunk_bytes=SMALL_CHUNK, remote_stale_after=timedelta(hours=1))
    state = numpy_state(5)
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claim = {"host": os.uname().nodename, "pid": int(dead.stdout), "pid_start": "1", "unix": 0}
    store.backend.write_atomic(f"{RUN}/ckpt/.claim-000000000003-dead", json.dumps(claim).encode())
    store.backend.write_atomic(f"{RUN}/ckpt/000000000003/model/layer0.weight/c/0/0", b"partial")
    ref = store.save(RUN, 3, state, {})
    assert store.last_save_stats.outcome == "committed" and store.ref(RUN, 3) == ref
    assert store.verify(RUN, 3).ok
    assert [n for n in store.backend.list_dir(f"{RUN}/ckpt") if n.startswith(".")] == []
