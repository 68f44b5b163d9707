"""What Rebound changes in Prefect's engine to make a task run and a flow run cheaper.

tasks/engine_cache.py: a worker validates the settings a task run arrives with once, and a
change of settings on the coordinator still reaches the next task run; TLS contexts are kept
per CA file and read again when the file changes. flows/flow_heartbeats.py: a flow run still
sends its heartbeat, and its heartbeat thread is gone when the flow run returns."""

from __future__ import annotations

import os
import shutil
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import certifi
import prefect.flow_engine
import pytest
from distributed import LocalCluster
from prefect import flow, task
from prefect.cache_policies import NONE as NO_CACHE
from prefect.context import SettingsContext
from prefect.settings import temporary_settings

import tasks.engine_cache  # noqa: F401  (installed in this process and on the worker)
from flows import flow_heartbeats
from flows.task_runner import ReboundTaskRunner

pytestmark = pytest.mark.slow

_SEEN: list[Any] = []
"""Every settings model a task run saw on the worker, held so that no id is reused."""


@task(cache_policy=NO_CACHE, persist_result=False)
def settings_seen() -> dict[str, Any]:
    import prefect.task_engine

    settings = SettingsContext.get().settings
    _SEEN.append(settings)
    return {"pid": os.getpid(), "id": id(settings), "refresh_cache": settings.tasks.refresh_cache,
            "api_url": settings.api.url,
            "installed": getattr(prefect.task_engine.hydrated_context, "settings_kept", False)}


@flow
def three_task_runs() -> list[dict[str, Any]]:
    seen = [settings_seen.submit().result(), settings_seen.submit().result()]
    with temporary_settings(updates={"tasks.refresh_cache": True}):
        seen.append(settings_seen.submit().result())
    return seen


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as local:
        yield local


def test_a_worker_validates_the_same_settings_once_and_sees_a_change(
        prefect_api: str, cluster: LocalCluster) -> None:
    runner = ReboundTaskRunner(address=cluster.scheduler_address)
    first, second, changed = three_task_runs.with_options(task_runner=runner)()
    assert first["pid"] == second["pid"] == changed["pid"] != os.getpid()
    assert first["installed"]
    # The second run reused the model the first one validated...
    assert second["id"] == first["id"]
    assert first["refresh_cache"] is False and first["api_url"] == prefect_api
    # ...and settings changed on the coordinator arrive as a model of their own.
    assert changed["id"] != first["id"]
    assert changed["refresh_cache"] is True and changed["api_url"] == prefect_api


def test_tls_contexts_are_kept_per_ca_file_and_its_version(tmp_path: Path) -> None:
    import prefect.client.orchestration as orchestration

    kept_ssl = orchestration.ssl
    bundle = tmp_path / "ca.pem"
    shutil.copyfile(certifi.where(), bundle)
    first = kept_ssl.create_default_context(cafile=str(bundle))
    assert kept_ssl.create_default_context(cafile=str(bundle)) is first
    assert first.verify_mode == ssl.CERT_REQUIRED and first.check_hostname
    st = bundle.stat()
    os.utime(bundle, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    assert kept_ssl.create_default_context(cafile=str(bundle)) is not first
    # Prefect makes its insecure context from a bare call and then changes it: never shared.
    assert kept_ssl.create_default_context() is not kept_ssl.create_default_context()
    assert kept_ssl.SSLContext is ssl.SSLContext and kept_ssl.CERT_NONE == ssl.CERT_NONE


_BEAT = threading.Event()


@flow
def heartbeat_thread_alive() -> list[str]:
    _BEAT.wait(timeout=60)  # the first beat, sent from the heartbeat thread as the run starts
    return [t.name for t in threading.enumerate() if t.name == "rebound-flow-heartbeat"]


def test_a_flow_run_beats_and_its_heartbeat_ends_with_it(
        prefect_api: str, monkeypatch: pytest.MonkeyPatch) -> None:
    assert flow_heartbeats.INSTALLED
    assert prefect.flow_engine._send_heartbeats is flow_heartbeats.send_heartbeats
    beats: list[Any] = []
    emit = prefect.flow_engine.FlowRunEngine._emit_flow_run_heartbeat

    def counted(engine: Any, *args: Any) -> Any:
        beats.append(engine.flow_run.id)
        try:
            return emit(engine, *args)  # the real heartbeat event, sent to the API
        finally:
            _BEAT.set()

    monkeypatch.setattr(prefect.flow_engine.FlowRunEngine, "_emit_flow_run_heartbeat", counted)
    state = heartbeat_thread_alive(return_state=True)
    assert state.result() == ["rebound-flow-heartbeat"]  # beating while the run ran
    assert beats == [state.state_details.flow_run_id]
    assert not [t for t in threading.enumerate() if t.name == "rebound-flow-heartbeat"]
