"""`--async-save` end to end (issue 11): the same final state as synchronous saves; a worker
SIGKILLed during a background save and a disk that fills up under one leave nothing corrupt
visible, and the failure is in the summary."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest

from storage import open_store
from tests.cli_helpers import (
    STEPS,
    background_commits,
    cli_args,
    committed_steps,
    read_summary,
    run_cli,
    verify_store,
)
from tests.storage_helpers import small_tmpfs

pytestmark = pytest.mark.slow


def _run(store: Path, corpus: Path, run_id: str, *extra: str) -> tuple[subprocess.CompletedProcess,
                                                                        dict[str, Any]]:
    summary_path = store.parent / f"{run_id}.json"
    done = run_cli(cli_args(store, corpus, run_id, "--async-save", *extra,
                            "--summary-json", str(summary_path)))
    return done, read_summary(summary_path)


def test_async_and_sync_saves_end_in_the_same_state(reference: dict[str, Any], tmp_path: Path,
                                                    corpus: Path) -> None:
    done, s = _run(tmp_path / "store", corpus, "async")
    assert done.returncode == 0, done.stderr[-3000:]
    assert s["status"] == "completed" and s["state_hash"] == reference["state_hash"]
    # Every planned checkpoint was committed, those inside groups by the background thread.
    assert committed_steps(tmp_path / "store", "async") == list(range(5, STEPS + 1, 5))
    # Groups end every 10 steps, epochs every 20: the ends of epochs (evaluated from the store)
    # and of the run commit before their group returns; every other save is in the background.
    assert background_commits(tmp_path / "store", "async") == [5, 10, 15, 25, 30, 35]
    assert s["checkpoints_committed"] == reference["checkpoints_committed"]
    assert verify_store(tmp_path / "store", "async").returncode == 0


def test_a_worker_killed_during_a_background_save_loses_nothing_committed(
        reference: dict[str, Any], tmp_path: Path, corpus: Path) -> None:
    # Step 25 is inside the group (20, 30]: its save runs in the background while training goes
    # on, and the worker SIGKILLs itself after three of its chunk files.
    done, s = _run(tmp_path / "store", corpus, "kill-bg", "--chaos", "kill-during-save@25")
    assert done.returncode == 0, done.stderr[-3000:]
    assert s["state_hash"] == reference["state_hash"]
    [failure] = s["failures"]
    assert failure["kind"] == "kill-during-save"
    assert 25 in committed_steps(tmp_path / "store", "kill-bg")  # saved again by the retry
    assert verify_store(tmp_path / "store", "kill-bg").returncode == 0
    attempts = [doc for _, doc in open_store(str(tmp_path / "store")).list_json("kill-bg", "attempts")]
    assert any(a.get("bytes_reused") for a in attempts)  # the dead save's verified chunks


def test_a_worker_killed_while_a_group_end_commits_in_thebackground_commits(
        reference: dict[str, Any], tmp_path: Path, corpus: Path) -> None:
    # Step 30 ends the group (20, 30] but no epoch: the group returns while its checkpoint is
    # written, and the worker dies during that save. The flow had taken the group as done.
    done, s = _run(tmp_path / "store", corpus, "kill-end", "--chaos", "kill-during-save@30")
    assert done.returncode == 0, done.stderr[-3000:]
    assert s["state_hash"] == reference["state_hash"]
    assert [f["kind"] for f in s["failures"]] == ["kill-during-save"]
    assert 30 in committed_steps(tmp_path / "store", "kill-end")  # written again
    assert verify_store(tmp_path / "store", "kill-end").returncode == 0


def test_a_background_write_failure_fails_the_run_in_one_line(tmp_path: Path,
                                                              corpus: Path) -> None:
    # A tiny-preset checkpoint takes ~1.9 MiB of tmpfs (its small tensors packed): 6 MiB holds
    # 2-3 of them but never the 3 retained plus one being written, so with a checkpoint every
    # 2 steps and groups of 10, the save that meets ENOSPC is one of steps 2-10, all written in
    # the background (step 10 ends a group, not an epoch).
    with small_tmpfs(tmp_path / "full", "6m") as full:
        done, s = _run(full, corpus, "bg-full", "--ckpt-every", "2")
        on_disk = committed_steps(full, "bg-full")
        background = background_commits(full, "bg-full")
        verify = verify_store(full, "bg-full")
        leftovers = [p.name for p in (full / "bg-full" / "ckpt").iterdir()
                     if p.name.startswith(".staging-")]
    terminal = done.stdout + done.stderr
    assert done.returncode == 1, terminal[-3000:]
    assert "Traceback" not in terminal, terminal[-3000:]
    [error] = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert "No space left on device" in error
    assert s["status"] == "failed" and "No space left on device" in s["reason"]
    assert [f["kind"] for f in s["failures"]] == ["storage"]
    assert on_disk and max(on_disk) <= 10 and background == on_disk
    assert s["checkpoints_committed"] == len(on_disk)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert not leftovers  # a save no retry can finish gives its space back


def test_ckpt_every_auto_is_sized_by_the_measured_stall(reference: dict[str, Any], tmp_path: Path,
                                                        corpus: Path) -> None:
    from flows.plan import young_daly_interval

    done, s = _run(tmp_path / "store", corpus, "auto", "--ckpt-every", "auto", "--mtbf", "1s")
    assert done.returncode == 0, done.stderr[-3000:]
    assert s["state_hash"] == reference["state_hash"]  # the schedule never changes the math
    auto = s["ckpt_auto"]
    # The cost fed to Young/Daly is what training stood still for: with background saves, the
    # snapshot (and any wait for the save before), never the whole save.
    # Plus what the background saves cost the steps they overlapped (measured, >= 0).
    assert 0 < auto["stall_per_checkpoint_s"] and auto["mtbf_s"] == 1
    assert auto["drag_per_checkpoint_s"] >= 0
    assert auto["every"] == young_daly_interval(
        auto["stall_per_checkpoint_s"] + auto["drag_per_checkpoint_s"], 1, auto["step_s"], 10)
    print(auto)  # the interval picked, for the log
    assert "--ckpt-every auto: every" in done.stdout + done.stderr


def test_incremental_background_saves_end_in_the_same_state(reference: dict[str, Any],
                                                            tmp_path: Path, corpus: Path) -> None:
    # Full training moves every array, so nothing is linked here (the store's tests show what
    # is, with frozen layers); this shows the flag reaches the workers' saves and changes
    # nothing of the math or of what verify sees.
    done, s = _run(tmp_path / "store", corpus, "inc", "--incremental-saves")
    assert done.returncode == 0, done.stderr[-3000:]
    assert s["state_hash"] == reference["state_hash"]
    assert committed_steps(tmp_path / "store", "inc") == list(range(5, STEPS + 1, 5))
    assert verify_store(tmp_path / "store", "inc").returncode == 0


def test_a_groups_end_off_the_interval_is_no_checkpoint_and_the_next_group_goes_on_from_memory(
        reference: dict[str, Any], tmp_path: Path, corpus: Path) -> None:
    # Groups end every 10 steps and epochs every 20; checkpoints every 4. The ends at 10 and 30
    # are off the interval and end no epoch: no save there, and the group after each starts
    # from the worker's memory, which is bit for bit what a checkpoint there would have held.
    done, s = _run(tmp_path / "store", corpus, "bare-ends", "--ckpt-every", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert s["status"] == "completed" and s["state_hash"] == reference["state_hash"]
    assert committed_steps(tmp_path / "store", "bare-ends") == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    attempts = sorted((doc for _, doc in open_store(str(tmp_path / "store")).list_json(
        "bare-ends", "attempts")), key=lambda a: a["first_step"])
    after_bare_end = [a for a in attempts if a["first_step"] in (10, 30)]
    assert [(a["resumed_from_step"], a["warm"]) for a in after_bare_end] == [(10, True), (30, True)]
    assert verify_store(tmp_path / "store", "bare-ends").returncode == 0


def test_a_worker_killed_after_a_bare_group_end_resumes_from_the_interval_checkpoint(
        reference: dict[str, Any], tmp_path: Path, corpus: Path) -> None:
    # The group (10, 20] starts from memory (no checkpoint at 10); its worker dies before step
    # 15. The retry, on another worker, has no memory of its own: it loads the newest interval
    # checkpoint (8 or 12, whichever had committed) and trains to the same bits.
    done, s = _run(tmp_path / "store", corpus, "bare-kill", "--ckpt-every", "4",
                   "--chaos", "kill-worker@15")
    assert done.returncode == 0, done.stderr[-3000:]
    assert s["status"] == "completed" and s["state_hash"] == reference["state_hash"]
    [failure] = s["failures"]
    assert failure["kind"] in ("kill-worker", "worker-lost") and failure["step"] in (14, 15)
    assert failure["restored_from"] == "checkpoint" and 2 <= failure["lost_steps"] <= 7
    assert verify_store(tmp_path / "store", "bare-kill").returncode == 0
