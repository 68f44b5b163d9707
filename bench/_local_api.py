"""Benches stop what they start, the Prefect API kept between runs (flows/kept_api.py) included.

The Rebound runs a bench starts use the server kept for their REBOUND_HOME as any run does, so
that rounds after the first measure a warm machine, as a user's second run is. One that was up
before the bench is left as it was; one the bench's runs started is stopped at its end, by PID.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from flows.kept_api import read_record, stop_kept_server

ROOT = Path(__file__).resolve().parents[1]


def kept_api_folder() -> Path:
    """PREFECT_HOME as the bench's `python -m flows.train` runs (cwd ROOT) will set it."""
    if os.environ.get("PREFECT_HOME"):
        return Path(os.environ["PREFECT_HOME"]).expanduser().resolve()
    return (ROOT / os.environ.get("REBOUND_HOME", ".rebound")).resolve() / "prefect"


@contextmanager
def kept_api_stopped_after() -> Iterator[None]:
    """Stop, on the way out, a kept Prefect API started while inside. The runs inside train
    on clusters of their own (REBOUND_CLUSTER_IDLE=0 unless set): the benches find the
    processes they kill in each run's process group, and time every contender's workers from
    its command."""
    os.environ.setdefault("REBOUND_CLUSTER_IDLE", "0")
    os.environ.setdefault("REBOUND_COORDINATOR_IDLE", "0")  # each run's processes its own
    if os.environ.get("PREFECT_API_URL"):  # the runs use that server: none is kept
        yield
        return
    folder = kept_api_folder()
    before = read_record(folder)
    try:
        yield
    finally:
        after = read_record(folder)
        if after is not None and (before is None or after["pid"] != before["pid"]):
            stop_kept_server(folder)
