"""Session-wide fixtures: one real Prefect API (temporary SQLite server) for every flow test.

Its URL goes into os.environ so that CLI subprocesses and the Dask workers they spawn report to
this one server instead of each starting its own (STACK-NOTES: the ephemeral-server trap).
"""

from __future__ import annotations

import os
import shutil
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_SESSION_TMP = Path(tempfile.mkdtemp(prefix="rebound-tests-"))
os.environ.setdefault("PREFECT_HOME", str(_SESSION_TMP / "prefect-home"))
os.environ.setdefault("REBOUND_HOME", str(_SESSION_TMP / "rebound-home"))
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
os.environ["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
# A CLI run that starts its own Prefect API stops it with itself, never leaving one behind for
# later runs: tests stop what they start. tests/test_kept_api.py sets its own value.
os.environ.setdefault("REBOUND_API_IDLE", "0")
# The same for the Dask cluster kept between runs; tests/test_kept_cluster.py sets its own.
os.environ.setdefault("REBOUND_CLUSTER_IDLE", "0")
# And for the coordinator kept warm between runs; tests/test_kept_coordinator.py sets its own.
os.environ.setdefault("REBOUND_COORDINATOR_IDLE", "0")


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """URL of a real temporary Prefect API, exported to every process the tests start."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        url = PREFECT_API_URL.value()
        os.environ["PREFECT_API_URL"] = url
        try:
            yield url
        finally:
            os.environ.pop("PREFECT_API_URL", None)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small real-text corpus: a few of the standard library's own source files."""
    folder = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("argparse.py", "collections/__init__.py", "dataclasses.py", "json/decoder.py"):
        shutil.copy(stdlib / name, folder / name.replace("/", "_"))
    return folder


@pytest.fixture(scope="session")
def reference_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("reference") / "store"


@pytest.fixture(scope="session")
def reference(prefect_api: str, reference_store: Path, corpus: Path) -> dict[str, Any]:
    """Summary of the tests' run done once, never interrupted: what every recovery must match."""
    from tests.cli_helpers import cli_args, read_summary, run_cli

    summary_path = reference_store.parent / "reference.json"
    done = run_cli(cli_args(reference_store, corpus, "reference", "--summary-json",
                            str(summary_path)))
    assert done.returncode == 0, done.stderr[-3000:]
    return read_summary(summary_path)


# Issue 7 (16): a dependency outside the tested ranges fails the suite at once, naming it.
from flows.versions import check_versions  # noqa: E402

check_versions()
