"""Issue 7 (15, 17): every flag of `python -m flows.train` works or is refused with one line
(exit 2, nothing touched); a fresh clone's first run prints no Prefect home warning."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from distributed import LocalCluster

from flows.kept_api import stop_kept_server
from tests.cli_helpers import ROOT, cli_args, kill_group, run_cli, start_cli

HOME_WARNING = "Failed to create the Prefect home directory"


@pytest.fixture(scope="module")
def one_worker_scheduler() -> Iterator[str]:
    """A real scheduler with exactly one (in-process) worker, on 127.0.0.1."""
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tcp://",
                      host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster:
        yield cluster.scheduler_address


def _refused(tmp_path: Path, corpus: Path, *extra: str) -> str:
    store = tmp_path / "store"
    done = run_cli(cli_args(store, corpus, "flags", *extra), timeout_s=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 2, done.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr[-3000:]
    assert not store.exists()  # nothing touched
    return lines[0]


@pytest.mark.parametrize("extra, words", [
    (["--workers", "3"], ["--workers 3", "cannot be split into 3 equal shares"]),
    (["--collective-timeout", "5s"], ["--collective-timeout", "--workers >= 2"]),
    (["--workers", "2", "--chaos", "kill-worker@5/2"], ["kill-worker@5/0.2", "2 ranks"]),
    (["--replica-policy", "vote"], ["--replica-policy", "--replicas >= 2"]),
    (["--replicas", "2", "--vote-every", "3"], ["--vote-every", "--replica-policy vote"]),
    (["--chaos", "perturb-replica@3"], ["perturb-replica", "--replicas >= 2"]),
    (["--replicas", "2", "--chaos", "kill-worker@5/2.0"], ["kill-worker@5/2.0", "2 replica"]),
    (["--lease-ttl", "soon"], ["--lease-ttl", "not a duration"]),
    (["--mtbf", "2h"], ["--mtbf", "--ckpt-every auto"]),
])
def test_flags_that_would_do_nothing_are_refused(tmp_path: Path, corpus: Path,
                                                 extra: list[str], words: list[str]) -> None:
    line = _refused(tmp_path, corpus, *extra)
    assert all(w in line for w in words), line


def test_cluster_refuses_cold_standby(tmp_path: Path, corpus: Path,
                                      one_worker_scheduler: str) -> None:
    line = _refused(tmp_path, corpus, "--cluster", one_worker_scheduler, "--standby", "cold")
    assert "--standby cold" in line and "--cluster" in line


@pytest.mark.parametrize("extra, need", [(["--spares", "1"], 2),
                                         (["--workers", "2", "--spares", "0"], 2)])
def test_cluster_with_too_few_workers_fails_naming_them(tmp_path: Path, corpus: Path,
                                                        one_worker_scheduler: str,
                                                        extra: list[str], need: int) -> None:
    # Waits up to --no-worker-timeout for workers to join, then fails (exit 1), one line.
    store = tmp_path / "store"
    done = run_cli(cli_args(store, corpus, "flags", "--cluster", one_worker_scheduler, *extra,
                            "--no-worker-timeout", "2s"), timeout_s=120)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1, done.stderr[-3000:]
    assert len(lines) == 1, done.stderr[-3000:]
    assert one_worker_scheduler in lines[0] and "1 worker(s)" in lines[0]
    assert f"needs {need}" in lines[0]
    assert not store.exists()


def test_help_says_what_is_refused() -> None:
    done = subprocess.run([sys.executable, "-m", "flows.train", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    replicas = text.rsplit("--replicas R", 1)[1].split(" --", 1)[0]  # its help, not the usage
    assert "N x R" in replicas, replicas
    assert "refused with --cluster" in text
    workers = text.rsplit("--workers W", 1)[1].split(" --", 1)[0]
    assert "must divide" in workers and "refused unless" in workers


@pytest.mark.slow
def test_first_run_on_a_fresh_clone_prints_no_prefect_home_warning(tmp_path: Path,
                                                                   corpus: Path) -> None:
    # A real tiny run as on a fresh clone: no Prefect home, no API (our own server starts).
    home = tmp_path / "fresh" / "rebound-home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(REBOUND_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    args = cli_args(tmp_path / "store", corpus, "fresh", "--steps", "10", "--spares", "0")
    proc = start_cli(args, env=env)
    try:
        _, err = proc.communicate(timeout=240)
    finally:
        kill_group(proc)  # the run's workers, by process group
        stop_kept_server(home / "prefect")  # the API kept for later runs, by its PID
    assert proc.returncode == 0, err[-3000:]
    assert HOME_WARNING not in err
    assert (home / "prefect").is_dir()
