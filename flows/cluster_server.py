"""`python -m flows.cluster_server`: the local Dask cluster kept between runs
(flows/kept_cluster.py).

Holds a LocalCluster exactly as a run would start it (flows.cluster.local_cluster: hot standby,
workers forked from a warm forkserver). Once the workers are up it records itself in
REBOUND_HOME/cluster.json and prints the scheduler's address on its stdout. It exits on its own
once no run has used it for --idle-s seconds (flows.api_server.exit_when_idle), closing its
workers; SIGTERM closes them too.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

KEPT: list[Any] = []
"""The LocalCluster this process holds (rescale_kept reaches it from the scheduler)."""


def rescale_kept(drop: str | None, target: int, fresh: str) -> None:
    """Run on the scheduler (client.run_on_scheduler): flows.cluster.rescale on the held
    cluster, on its own event loop."""
    from flows.cluster import rescale

    cluster = KEPT[0]
    cluster.loop.add_callback(rescale, cluster, drop, target, fresh)


def _write_record(record: Path, address: str, key: str, idle_s: float) -> None:
    from flows.kept_api import write_record

    write_record(record, {"pid": os.getpid(), "address": address, "key": key,
                          "idle_s": idle_s, "python": sys.executable,
                          "started_unix": time.time()})


def _stop_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(0)  # unwinds through local_cluster's exit: the workers are closed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m flows.cluster_server")
    parser.add_argument("--workers", type=int, required=True)
    parser.add_argument("--gpu", type=int, choices=(0, 1), required=True)
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--idle-s", type=float, required=True)
    parser.add_argument("--users", type=Path, required=True)
    parser.add_argument("--record", type=Path, required=True)
    parser.add_argument("--key", required=True, help="the key it was started for (its record)")
    parser.add_argument("--lock-fd", type=int, required=True,
                        help="the start lock, held by the run that started this server: "
                        "released once the record is written")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    from flows.worker_forkserver import start_worker_forkserver

    start_worker_forkserver()  # before Dask's import: it reads the start method then
    from flows.api_server import exit_when_idle, record_is_mine
    from flows.cluster import local_cluster

    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    stop = threading.Event()
    try:
        with local_cluster(args.workers, args.dir, bool(args.gpu), boot_low=True) as cluster:
            # Run as __main__, this file is a module of its own; the scheduler resolves
            # rescale_kept (pickled by name) in flows.cluster_server, so register it there.
            importlib.import_module("flows.cluster_server").KEPT.append(cluster)
            _write_record(args.record, cluster.scheduler_address, args.key, args.idle_s)
            os.close(args.lock_fd)  # other runs may look now, and find it
            with contextlib.suppress(BrokenPipeError):  # the run that started it has ended
                print(cluster.scheduler_address, flush=True)
            os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # the run reads one line
            threading.Thread(target=exit_when_idle,
                             args=(stop.set, args.users, args.record, args.idle_s),
                             daemon=True, name="idle-exit").start()
            stop.wait()
    finally:
        if record_is_mine(args.record):  # stopped by a signal: leave no record behind
            args.record.unlink(missing_ok=True)


if __name__ == "__main__":
    main()
