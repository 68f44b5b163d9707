"""Prefect deployments end to end (issue 10), the way an operator runs them: a real `prefect
server` on 127.0.0.1, the `rebound-process` pool, `prefect deploy --all` from prefect.yaml and a
`process` worker (tests/prefect_server.py). Each run is the tests' tiny run (tests/cli_helpers.py)
and must end with the uninterrupted run's state_hash.

- A run with a chaos event completes; the API shows its epochs, a retried task and its summary
  artifact; the checkpoints verify.
- A run whose flow process is SIGKILLed (its coordinator lost) goes Crashed, the heal trigger
  of prefect.yaml runs it again, and the rerun resumes from the store.
- A run that fails for bad input stays Failed (not healed); a second live run of the same
  deployment is cancelled; a heal past the cap is refused by the server.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from storage import lease, open_store
from tests.cli_helpers import CKPT, GROUP, STEPS, committed_steps
from tests.prefect_server import PrefectServer, prefect_server
from tests.storage_helpers import run_storage_cli

# Server start, deploy and every run share one machine with the rest of the suite: generous.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

DEPLOYMENT = "tiny-smoke"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """One server for the module: pool created, prefect.yaml deployed, one worker polling."""
    started = time.monotonic()
    with prefect_server(tmp_path_factory.mktemp("deploy")) as server:
        server.deploy()
        server.start_worker()
        print(f"server up, deployed, worker started in {time.monotonic() - started:.1f}s")
        yield server


def _params(store: Path, corpus: Path, run_id: str, **extra: Any) -> dict[str, Any]:
    """The deployment's parameters for the tests' run (cli_args of tests/cli_helpers.py)."""
    return {"params": {"model": "tiny", "steps": STEPS, "group_steps": GROUP,
                       "ckpt_every": CKPT, "store": str(store), "data": str(corpus),
                       "run_id": run_id, "threads": 1, "keep": 20, "fresh": True, **extra}}


def _latest(store: Path, run_id: str) -> dict[str, Any]:
    """`python -m storage verify` passes and `inspect latest` describes the final checkpoint."""
    verify = run_storage_cli("verify", str(store), run_id)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    inspect = run_storage_cli("inspect", str(store), run_id, "latest", "--json")
    assert inspect.returncode == 0, inspect.stderr
    return json.loads(inspect.stdout)


def _logs(server: PrefectServer, flow_run_ids: list[str]) -> list[str]:
    logs = server.api("post", "/logs/filter", json={
        "logs": {"flow_run_id": {"any_": flow_run_ids}}, "sort": "TIMESTAMP_ASC"})
    return [entry["message"] for entry in logs]


def test_a_deployment_run_with_a_chaos_event_completes(server: PrefectServer, corpus: Path,
                                                        reference: dict[str, Any],
                                                        tmp_path: Path) -> None:
    store = tmp_path / "store"
    started = time.monotonic()
    run = server.create_run(DEPLOYMENT, _params(store, corpus, "deploy-chaos", chaos="raise@12"))
    done = server.wait_for_state(run["id"])
    took = time.monotonic() - started
    assert done["state"]["type"] == "COMPLETED", (done["state"], server.log_tail())

    # The epochs are subflows of the deployment's run; their task runs are the batch groups.
    epochs = server.api("post", "/flow_runs/filter", json={
        "flow_runs": {"parent_flow_run_id": {"any_": [run["id"]]}}})
    assert sorted(e["name"] for e in epochs) == ["deploy-chaos epoch 0", "deploy-chaos epoch 1"]
    assert all(e["state"]["type"] == "COMPLETED" for e in epochs)
    tasks = server.api("post", "/task_runs/filter", json={
        "task_runs": {"flow_run_id": {"any_": [e["id"] for e in epochs]}}})
    groups = [t for t in tasks if t["task_key"].startswith("train_batch_group")]
    assert len(groups) >= STEPS // GROUP
    assert all(t["state"]["type"] == "COMPLETED" for t in groups)
    # raise@12: the group of steps 11-20 raised once and its retry completed it.
    assert [t["run_count"] for t in groups if t["run_count"] > 1] == [2], groups

    artifacts = server.api("post", "/artifacts/filter", json={
        "artifacts": {"flow_run_id": {"any_": [run["id"]]}}})
    summary = [a for a in artifacts if a["key"] == "rebound-summary"]
    assert len(summary) == 1 and summary[0]["type"] == "markdown"
    assert "deploy-chaos" in summary[0]["data"] and "completed" in summary[0]["data"]

    latest = _latest(store, "deploy-chaos")
    assert latest["verified"] is True and latest["metadata"]["step"] == STEPS
    assert latest["state_hash"] == reference["state_hash"]
    print(f"chaos run: created to Completed in {took:.1f}s")


def test_a_crashed_run_heals_and_resumes_from_the_store(server: PrefectServer, corpus: Path,
                                                        reference: dict[str, Any],
                                                        tmp_path: Path) -> None:
    store = tmp_path / "store"
    first = server.create_run(DEPLOYMENT, _params(store, corpus, "deploy-heal"))
    server.wait_for_run(lambda: any(s >= 2 * CKPT for s in committed_steps(store, "deploy-heal")),
                        "a checkpoint past the first group")
    # The coordinator is the flow-run process that holds the run's lease.
    holder = lease.read(open_store(str(store)), "deploy-heal").holder
    assert holder.pid in server.flow_run_processes()
    assert "prefect.engine" in psutil.Process(holder.pid).cmdline()
    # Its Dask cluster outlives it for a while: stopped by PID at the end.
    server.extra_pids |= {c.pid for c in psutil.Process(holder.pid).children(recursive=True)}
    os.kill(holder.pid, signal.SIGKILL)
    killed = time.monotonic()

    crashed = server.wait_for_state(first["id"])
    crashed_s = time.monotonic() - killed
    assert crashed["state"]["type"] == "CRASHED", crashed["state"]

    def healed_run() -> dict[str, Any] | None:
        return next((r for r in server.runs_of(DEPLOYMENT)
                     if r["parameters"]["params"].get("run_id") == "deploy-heal"
                     and r["id"] != first["id"]), None)

    heal = server.wait_for_run(healed_run, "the heal trigger's run")
    created_s = time.monotonic() - killed
    assert heal["created_by"]["type"] == "AUTOMATION", heal["created_by"]
    assert heal["parameters"]["params"] == first["parameters"]["params"] | {
        "fresh": False, "heal_attempt": 1}
    done = server.wait_for_state(heal["id"])
    healed_s = time.monotonic() - killed
    assert done["state"]["type"] == "COMPLETED", (done["state"], server.log_tail())

    resumed = [m for m in _logs(server, [heal["id"]]) if m.startswith("resuming run deploy-heal")]
    assert resumed, _logs(server, [heal["id"]])
    step = int(resumed[0].split("from step ")[1].split(",")[0])
    assert step >= 2 * CKPT
    latest = _latest(store, "deploy-heal")
    assert latest["metadata"]["step"] == STEPS
    assert latest["state_hash"] == reference["state_hash"]
    mine = [r for r in server.runs_of(DEPLOYMENT)
            if r["parameters"]["params"].get("run_id") == "deploy-heal"]
    assert len(mine) == 2  # healed once, nothing more
    print(f"heal: Crashed {crashed_s:.1f}s after the SIGKILL, rerun created at {created_s:.1f}s, "
          f"resumed from step {step}, Completed at {healed_s:.1f}s")


def test_a_user_error_is_not_healed_and_one_run_is_live(server: PrefectServer, corpus: Path,
                                                        tmp_path: Path) -> None:
    store = tmp_path / "store"
    # The cap is in the parameter schema: the server refuses a fourth automatic rerun.
    with pytest.raises(httpx.HTTPStatusError) as refused:
        server.create_run(DEPLOYMENT, _params(store, corpus, "deploy-bad", heal_attempt=4))
    assert refused.value.response.status_code == 409
    assert "heal_attempt" in refused.value.response.text

    # Bad input (a corpus that is not there: exit 2 on the CLI) fails before any work.
    before = {r["id"] for r in server.runs_of(DEPLOYMENT)}
    bad = _params(store, tmp_path / "no-such-corpus", "deploy-bad")
    runs = [server.create_run(DEPLOYMENT, bad), server.create_run(DEPLOYMENT, bad)]
    ends = [server.wait_for_state(r["id"]) for r in runs]
    # One live run per deployment: the second is cancelled when it meets the first still
    # live; when the first had already failed (a bad input fails in seconds) it runs after it,
    # never beside it.
    kinds = sorted(e["state"]["type"] for e in ends)
    assert kinds in (["CANCELLED", "FAILED"], ["FAILED", "FAILED"]), ends
    if kinds == ["FAILED", "FAILED"]:
        first, second = sorted(ends, key=lambda e: e["start_time"])
        assert datetime.fromisoformat(first["end_time"]) <= \
            datetime.fromisoformat(second["start_time"]), ends
    for failed in (e for e in ends if e["state"]["type"] == "FAILED"):
        assert "ConfigurationError" in failed["state"]["message"], failed["state"]
    assert not (store / "deploy-bad").exists()
    # A crash is healed within a few seconds (the test above); a failure never is.
    settle = time.monotonic() + 15.0
    while time.monotonic() < settle:
        new = [r for r in server.runs_of(DEPLOYMENT) if r["id"] not in before]
        assert len(new) == 2, new
        time.sleep(0.5)  # watching for a run that must not appear: a bounded look, no event
