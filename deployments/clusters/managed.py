"""Run the flow on a cluster this process builds from a spec file, and let Rebound scale it.

    python deployments/clusters/managed.py deployments/clusters/slurm.py -- \
        --workers 2 --spares 1 --device cuda --threads 8 --store /shared/runs

The spec file defines `make_cluster()` returning a Dask cluster manager (a SLURMCluster, or any
SpecCluster). This script validates the flow's flags, builds the cluster, scales it to the
run's ranks plus spares, registers it in flows.cluster.MANAGERS and runs `python -m
flows.train --cluster <its scheduler>` in this same process. The flow's Provisioner
(flows/redundancy.py) then finds the manager and asks it for a worker in place of each
quarantined one, as it does with the LocalCluster the CLI starts. Exit status: the CLI's.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

PROJECT = Path(__file__).resolve().parents[2]


def load_spec(path: Path) -> Any:
    """The spec file as a module (it must define make_cluster())."""
    spec = importlib.util.spec_from_file_location(f"rebound_cluster_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"error: cannot load cluster spec {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: list[str]) -> int:
    """`SPEC [--] FLOW FLAGS...`; returns the CLI's exit status."""
    if not argv or argv[0].startswith("-"):
        sys.stderr.write("usage: managed.py SPEC.py [--] FLOW FLAGS...\n")
        return 2
    spec_path, flow_argv = Path(argv[0]), argv[1:]
    if flow_argv[:1] == ["--"]:
        flow_argv = flow_argv[1:]
    sys.path.insert(0, str(PROJECT))
    # Prefect reads its settings when imported: set them before anything imports it.
    from flows.prefect_env import prepare_environment

    local_api = prepare_environment()
    from flows.cli import main as cli_main
    from flows.cli import parse_params
    from flows.cluster import MANAGERS
    from flows.redundancy import local_cluster_size

    # The flags are checked before a job is submitted (exit 2 on bad usage); the data and the
    # store are checked by the CLI below, as on any --cluster.
    params, _ = parse_params([*flow_argv, "--cluster", "tcp://0.0.0.0:8786"])
    cluster = load_spec(spec_path).make_cluster()
    address = cluster.scheduler_address
    try:
        cluster.scale(local_cluster_size(params))
        MANAGERS[address] = cluster
        return cli_main([*flow_argv, "--cluster", address], local_api=local_api)
    finally:
        MANAGERS.pop(address, None)
        cluster.close(timeout=60)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
