"""`python -m flows.train` end to end: real Prefect API, real multi-process Dask LocalCluster,
real Zarr checkpoints on disk, real SIGKILL. Tiny preset so each run takes seconds of training."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_helpers import (
    CKPT,
    ROOT,
    STEPS,
    cli_args,
    committed_steps,
    kill_when,
    read_summary,
    run_cli,
    start_cli,
    tree_state,
)

pytestmark = pytest.mark.slow

@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("flow")


def test_short_run_completes_with_verified_checkpoints(reference: dict, reference_store: Path) -> None:
    s = reference
    assert s["status"] == "completed" and s["reason"] is None
    assert s["final_step"] == STEPS
    assert s["checkpoints_committed"] == STEPS // CKPT
    assert len(s["state_hash"]) == 32
    assert 0 < s["productive_s"] <= s["wall_s"] and 0 < s["ettr"] <= 1
    assert s["train_loss"] < 5.5
    store = reference_store
    assert committed_steps(store, "reference") == list(range(CKPT, STEPS + 1, CKPT))
    verify = subprocess.run(
        [sys.executable, "-m", "storage", "verify", str(store), "reference"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert verify.returncode == 0, verify.stdout + verify.stderr
    inspect = subprocess.run(
        [sys.executable, "-m", "storage", "inspect", str(store), "reference", "latest"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert s["state_hash"] in inspect.stdout


def test_sigkilled_run_resumes_bit_exact(reference: dict, workdir: Path, corpus: Path) -> None:
    store = workdir / "store"
    args = cli_args(store, corpus, "killed")
    kill_when(start_cli(args), lambda: any(s >= 20 for s in committed_steps(store, "killed")))
    killed_at = max(committed_steps(store, "killed"))
    assert killed_at < STEPS
    summary_path = workdir / "killed.json"
    again = run_cli(args + ["--summary-json", str(summary_path)])
    assert again.returncode == 0, again.stderr[-3000:]
    s = read_summary(summary_path)
    assert s["status"] == "completed" and s["final_step"] == STEPS
    assert s["resumed_from_step"] is not None and s["resumed_from_step"] >= 20
    assert f"resuming run killed from step {s['resumed_from_step']}, verified" in again.stderr
    assert s["state_hash"] == reference["state_hash"]


def test_task_that_raises_once_is_retried(reference: dict, workdir: Path, corpus: Path) -> None:
    summary_path = workdir / "raised.json"
    done = run_cli(
        cli_args(
            workdir / "store",
            corpus,
            "raised",
            "--chaos",
            "raise@17",
            "--summary-json",
            str(summary_path),
        )
    )
    assert done.returncode == 0, done.stderr[-3000:]
    s = read_summary(summary_path)
    assert s["status"] == "completed"
    assert [f["kind"] for f in s["failures"]] == ["raise"]
    assert s["failures"][0]["step"] == 17 and s["failures"][0]["lost_steps"] == 1
    assert s["state_hash"] == reference["state_hash"]


def test_until_stops_cleanly_and_the_next_run_finishes(
    reference: dict, workdir: Path, corpus: Path
) -> None:
    store = workdir / "store"
    first = workdir / "sliced-1.json"
    done = run_cli(cli_args(store, corpus, "sliced", "--until", "15", "--summary-json", str(first)))
    assert done.returncode == 0, done.stderr[-3000:]
    s1 = read_summary(first)
    assert s1["status"] == "stopped" and s1["final_step"] == 15
    second = workdir / "sliced-2.json"
    done = run_cli(cli_args(store, corpus, "sliced", "--summary-json", str(second)))
    assert done.returncode == 0, done.stderr[-3000:]
    s2 = read_summary(second)
    assert s2["resumed_from_step"] == 15 and s2["status"] == "completed"
    assert s2["state_hash"] == reference["state_hash"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--steps", "-3"], "--steps"),
        (["--ckpt-every", "often"], "--ckpt-every"),
        (["--chaos", "meteor@3"], "--chaos"),
        (["--model", "gigantic"], "gigantic"),
        (["--time-budget", "soon"], "time-budget"),
        (["--bogus-flag"], "bogus"),
    ],
)
def test_bad_flags_exit_2_with_one_line(
    workdir: Path, corpus: Path, extra: list[str], message: str
) -> None:
    done = run_cli(cli_args(workdir / "bad-store", corpus, "bad") + extra, timeout_s=60)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert not (workdir / "bad-store").exists()


def test_missing_data_exits_2(workdir: Path) -> None:
    missing = workdir / "no-such-corpus"
    done = run_cli(
        ["--model", "tiny", "--store", str(workdir / "bad-store"), "--data", str(missing)],
        timeout_s=60,
    )
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and str(missing) in lines[0], done.stderr


def test_incompatible_existing_run_exits_2_and_touches_nothing(
    reference: dict, reference_store: Path, corpus: Path
) -> None:
    store = reference_store
    before = tree_state(store / "reference")
    for change in (["--steps", "60"], ["--seed", "7"], ["--threads", "2"]):
        done = run_cli(cli_args(store, corpus, "reference") + change, timeout_s=60)
        assert done.returncode == 2, done.stderr
        lines = [line for line in done.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and "reference" in lines[0] and "--fresh" in lines[0]
    assert tree_state(store / "reference") == before
