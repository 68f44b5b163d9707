"""The store on S3 (``s3://bucket/prefix``) against a real S3-compatible server on 127.0.0.1
(SeaweedFS ``weed mini``, tests/s3_server.py), endpoint and credentials only in the environment
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``) as a user sets them.

Run as a script it is one writer of the race test:
``python tests/test_storage_s3.py race URL RUN ROUNDS SEED BARRIER_DIR N`` races N-1 other writers
each round, first for a conditional create of one document, then to save the same step; it
prints one JSON line per round.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # as a script: the helpers beside it
from storage_helpers import (  # noqa: E402
    ROOT,
    SMALL_CHUNK,
    assert_same_tensors,
    env_for_child,
    numpy_state,
    race_save,
    run_storage_cli,
    start_writer,
)

WRITERS = 4
ROUNDS = 10


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A fresh ``weed mini`` for this module, its client settings in os.environ meanwhile (so
    every subprocess, the CLI's Dask workers included, inherits them)."""
    from s3_server import s3_server

    with s3_server(tmp_path_factory.mktemp("s3")) as server:
        saved = {k: os.environ.get(k) for k in server.env}
        os.environ.update(server.env)
        try:
            yield server
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture
def url(s3) -> str:
    return s3.url(f"t{uuid.uuid4().hex[:12]}")


def test_round_trip_sharded_save_and_cli_verify_export_gc(url: str, tmp_path: Path) -> None:
    from storage import open_store

    store = open_store(url, chunk_bytes=SMALL_CHUNK)
    states = {step: numpy_state(step) for step in (1, 2, 3, 4)}
    for step in (1, 2, 3):
        store.save("run", step, states[step], {"step": step})
        assert store.last_save_stats.outcome == "committed"
    got = store.load("run", 2)
    assert_same_tensors(got.tensors, states[2])
    assert got.metadata == {"step": 2}
    # Saved once, straight to the final keys: no staging prefix, no intent left behind.
    assert [n for n in store.backend.list_dir("run/ckpt") if n.startswith(".")] == []

    # Two ranks write one checkpoint; the committer copies the shares under the step's intent.
    plan = store.plan_shards(states[4], 2)
    assert all(plan)
    receipts = [store.write_share("run", 4, states[4], session="s1", rank=r, world_size=2) for r in (0, 1)]
    ref4 = store.commit_shares("run", 4, receipts, {"step": 4}, session="s1")
    assert store.steps("run") == [1, 2, 3, 4] and store.ref("run", 4) == ref4
    assert_same_tensors(store.load("run", 4).tensors, states[4])

    done = run_storage_cli("verify", url, "run", "--json")
    assert done.returncode == 0, done.stderr
    assert [c["step"] for c in json.loads(done.stdout)["checkpoints"]] == [1, 2, 3, 4]
    out = tmp_path / "ckpt.safetensors"
    done = run_storage_cli("export", url, "run", "latest", "--out", str(out))
    assert done.returncode == 0, done.stderr
    from safetensors.numpy import load_file

    exported = load_file(str(out))
    assert sorted(exported) == sorted(states[4])
    done = run_storage_cli("gc", url, "run", "--keep-last", "2")
    assert done.returncode == 0, done.stderr
    assert open_store(url).steps("run") == [3, 4]


def _race(argv: list[str]) -> int:
    """One racing writer (see the module doc)."""
    from storage import open_store
    from storage.faults import ENV, _barrier

    url, run, rounds, seed, barrier, n = argv[0], argv[1], int(argv[2]), int(argv[3]), argv[4], int(argv[5])
    store = open_store(url, chunk_bytes=SMALL_CHUNK)
    state = numpy_state(seed)
    for step in range(rounds):
        _barrier(f"{barrier}/doc{step}", n)
        created = store.create_json_exclusive(run, f"race-{step}", {"seed": seed})
        # Meet where every writer has just found the step without a marker: they all race
        # for the step's intent (a conditional create), then the winner for the marker.
        os.environ[ENV] = f"barrier:existing-no-marker:{barrier}/{step}:{n}"
        row = race_save(store, run, step, state, {"seed": seed})
        stats = store.last_save_stats
        row.update(created=created, files_written=stats.files_written, seed=seed)
        print(json.dumps(row), flush=True)
    return 0


def test_writers_racing_one_step_leave_exactly_one_winner(url: str, tmp_path: Path) -> None:
    from storage import open_store

    procs = [
        subprocess.Popen(
            [sys.executable, str(Path(__file__)), "race", url, "race", str(ROUNDS), str(300 + i),
             str(tmp_path / "barrier"), str(WRITERS)],
            cwd=ROOT, env=env_for_child(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(WRITERS)
    ]
    try:
        outs = [p.communicate(timeout=240) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0] * WRITERS, [o[1][-2000:] for o in outs]
    rows = [json.loads(line) for out, _ in outs for line in out.splitlines()]
    store = open_store(url)
    assert store.steps("race") == list(range(ROUNDS))
    for step in range(ROUNDS):
        mine = [r for r in rows if r["step"] == step]
        assert len(mine) == WRITERS
        assert sum(r["created"] for r in mine) == 1, mine  # one conditional create wins
        assert sorted(r["outcome"] for r in mine) == ["committed"] + ["lost-race"] * (WRITERS - 1), mine
        winner = next(r for r in mine if r["outcome"] == "committed")
        # Losers wrote nothing at all (not one key of the winner's step) and got its ref.
        assert [r["files_written"] for r in mine if r is not winner] == [0] * (WRITERS - 1)
        assert {json.dumps(r["ref"], sort_keys=True) for r in mine} == {json.dumps(winner["ref"], sort_keys=True)}
        assert store.verify("race", step).ok
        assert_same_tensors(store.load("race", step).tensors, numpy_state(winner["seed"]))
    assert [n for n in store.backend.list_dir("race/ckpt") if n.startswith(".")] == []


def test_markerless_steps_are_collected_by_gc_only_when_nobody_writes_them(url: str, tmp_path: Path) -> None:
    from storage import open_store

    store = open_store(url, chunk_bytes=SMALL_CHUNK, staging_grace=timedelta(0))
    store.save("gc", 1, numpy_state(1), {})
    # A live writer paused after its chunks, before its manifest: gc must leave its step alone.
    barrier = tmp_path / "paused"
    live = start_writer(url, "gc", 2, 2, REBOUND_STORAGE_FAULT=f"barrier:before-manifest:{barrier}:2")
    try:
        deadline = time.monotonic() + 60
        while not (barrier.is_dir() and any(barrier.iterdir())):
            assert live.poll() is None and time.monotonic() < deadline, live.stderr.read()
            time.sleep(0.05)  # polling for the writer's barrier file: it is the event
        assert store.backend.list_files("gc/ckpt/000000000002"), "the paused writer wrote chunks"
        assert store.clean_staging("gc") == []
        assert store.backend.list_files("gc/ckpt/000000000002")
        (barrier / "release").touch()
        out, err = live.communicate(timeout=60)
    finally:
        if live.poll() is None:
            live.kill()
            live.wait()
    assert live.returncode == 0, err
    assert json.loads(out)["outcome"] == "committed" and store.verify("gc", 2).ok

    # A writer SIGKILLed after 3 chunks: its step has files and no marker, its intent a dead pid.
    dead = start_writer(url, "gc", 3, 3, REBOUND_STORAGE_FAULT="chunks:3")
    dead.communicate(timeout=60)
    assert dead.returncode == -signal.SIGKILL
    assert store.steps("gc") == [1, 2]  # readers ignore it
    assert store.backend.list_files("gc/ckpt/000000000003")
    # Younger than the grace: gc leaves it (a retry of its writer may be coming).
    assert open_store(url, staging_grace=timedelta(minutes=10)).clean_staging("gc") == []
    assert store.backend.list_files("gc/ckpt/000000000003")
    deadline = time.monotonic() + 30
    while time.time() - store.backend._newest_unix("gc/ckpt/000000000003") < 5.5:
        assert time.monotonic() < deadline
        time.sleep(0.2)  # waiting out the CLI's default grace (5 s) is the condition itself
    done = run_storage_cli("gc", url, "gc", "--keep-last", "5")
    assert done.returncode == 0, done.stderr
    assert store.backend.list_files("gc/ckpt/000000000003") == []
    assert [n for n in store.backend.list_dir("gc/ckpt") if n.startswith(".")] == []
    assert store.steps("gc") == [1, 2] and all(store.verify("gc", s).ok for s in (1, 2))
    # The step is free again: a new save commits it.
    store.save("gc", 3, numpy_state(3), {})
    assert store.last_save_stats.outcome == "committed"


@pytest.mark.slow
@pytest.mark.timeout(600)  # the session's local reference run comes first when it runs alone
def test_training_on_s3_killed_and_resumed_matches_a_local_run(
    s3, reference: dict, corpus: Path, tmp_path: Path,
) -> None:
    from cli_helpers import cli_args, kill_when, read_summary, run_cli, start_cli

    from storage import open_store

    url = s3.url(f"train{uuid.uuid4().hex[:8]}")
    store = open_store(url)
    proc = start_cli(cli_args(url, corpus, "s3run"))  # endpoint and keys: only the environment
    kill_when(proc, lambda: any(s >= 15 for s in store.steps("s3run")))
    killed_at = max(store.steps("s3run"))
    summary = tmp_path / "summary.json"
    done = run_cli(cli_args(url, corpus, "s3run", "--summary-json", str(summary)))
    assert done.returncode == 0, done.stderr[-3000:]
    s = read_summary(summary)
    assert s["status"] == "completed" and s["resumed_from_step"] >= killed_at
    assert s["state_hash"] == reference["state_hash"]  # bit-exact with the local-store run
    done = run_storage_cli("verify", url, "s3run", "latest", "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["checkpoints"][0]["state_hash"] == reference["state_hash"]


if __name__ == "__main__":
    if sys.argv[1] != "race":
        raise SystemExit(f"unknown role {sys.argv[1]!r}")
    sys.path.insert(0, str(ROOT))
    raise SystemExit(_race(sys.argv[2:]))
