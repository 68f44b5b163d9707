"""A disk that fills up mid-run (a real, small tmpfs as the store): the run fails at once with
one line, keeps every checkpoint it committed, says how many, and resumes bit-exact elsewhere."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from storage import open_store
from tests.cli_helpers import ROOT, STEPS, cli_args, committed_steps, read_summary, run_cli
from tests.storage_helpers import small_tmpfs

pytestmark = pytest.mark.slow

TMPFS_SIZE = "6m"
"""A tiny-preset checkpoint takes ~1.9 MiB of tmpfs (1.4 MB of chunks in ~45 files, small tensors
packed; 4 KiB pages each; measured with `du -sk`): 2-3 commits fit, never the 3 retained
plus one being written, so a save meets ENOSPC."""


def test_full_disk_fails_in_one_line_and_resumes_bit_exact_on_roomier_storage(
        reference: dict, tmp_path: Path, corpus: Path) -> None:
    full = tmp_path / "full"
    roomy = tmp_path / "roomy"
    with small_tmpfs(full, TMPFS_SIZE):
        done = run_cli(cli_args(full, corpus, "full", "--summary-json",
                                str(tmp_path / "full.json")))
        s = read_summary(tmp_path / "full.json")
        on_disk = committed_steps(full, "full")
        attempts = [doc for _, doc in open_store(str(full)).list_json("full", "attempts")]
        verify = subprocess.run([sys.executable, "-m", "storage", "verify", str(full), "full"],
                                cwd=ROOT, capture_output=True, text=True, timeout=120)
        shutil.copytree(full / "full", roomy / "full")
    terminal = done.stdout + done.stderr
    assert done.returncode == 1, terminal[-3000:]
    assert "Traceback" not in terminal, terminal[-3000:]
    [error] = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert "No space left on device" in error and str(full) in error
    assert s["status"] == "failed" and "No space left on device" in s["reason"]
    assert 0 < len(on_disk) < STEPS // 5
    assert s["checkpoints_committed"] == len(on_disk)
    assert s["final_step"] == max(on_disk)
    assert [f["kind"] for f in s["failures"]] == ["storage"]
    assert verify.returncode == 0, verify.stdout + verify.stderr
    # No retry can free a disk: the group that met ENOSPC ran once (no save backoff, no task
    # retry, no epoch retry).
    failing = max(a["last_step"] for a in attempts)
    assert len([a for a in attempts if a["last_step"] == failing]) == 1
    assert all(a.get("save_retries", 0) == 0 for a in attempts)

    again = run_cli(cli_args(roomy, corpus, "full", "--summary-json", str(tmp_path / "again.json")))
    assert again.returncode == 0, again.stderr[-3000:]
    s2 = read_summary(tmp_path / "again.json")
    assert s2["resumed_from_step"] == max(on_disk)
    assert s2["state_hash"] == reference["state_hash"]
