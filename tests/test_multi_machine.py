"""Beyond one machine (issue 10, deployments/multi-machine.md): the example cluster specs build
what they describe without starting a job or a pod, and a data-parallel run with a spare on
`dask scheduler` + `dask worker` processes survives a worker killed from outside."""

from __future__ import annotations

import importlib.util
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import test_data_parallel_e2e as dp
from tests.cli_helpers import ROOT, RUN_TIMEOUT_S, cli_args, kill_group, read_summary
from tests.dask_cluster import CommandLineCluster
from tests.test_redundancy import _quarantined_and_replaced

CLUSTERS = ROOT / "deployments" / "clusters"
WORKER_FLAGS = ("--nthreads 1", "--resources GPU=1", "--preload tasks.preload")
"""What every Rebound GPU worker is started with, whoever starts it."""

# The data-parallel reference of tests/test_data_parallel_e2e.py (same flags, uninterrupted).
workdir = dp.workdir
dp_reference = dp.dp_reference


def test_the_slurm_spec_builds_a_gpu_cluster_without_submitting_a_job() -> None:
    spec = importlib.util.spec_from_file_location("slurm_spec", CLUSTERS / "slurm.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    # Its scheduler starts in this process (here on loopback); no job until scale(n).
    cluster = module.make_cluster(
        scheduler_options={"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0"})
    try:
        script = cluster.job_script()
        assert cluster.worker_spec == {} and cluster.scheduler_info["workers"] == {}
        assert "#SBATCH --gres=gpu:1" in script and "#SBATCH --cpus-per-task=8" in script
        assert all(flag in script for flag in WORKER_FLAGS), script
        assert f"cd {ROOT}" in script and cluster.scheduler_address in script
        # A manager the Provisioner can ask for workers (flows/redundancy.py): slots + scale.
        assert callable(cluster.scale) and cluster.new_worker_spec()
        # Rebound's scheduler settings reached the scheduler it started.
        assert cluster.scheduler.extensions.get("stealing") is None
    finally:
        cluster.close(timeout=30)


def _unknown_fields(doc: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Keys of doc the schema does not name: Kubernetes drops them silently (pruning)."""
    if isinstance(doc, list):
        return [u for item in doc for u in _unknown_fields(item, schema.get("items", {}), path)]
    if not isinstance(doc, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    props, extra = schema.get("properties"), schema.get("additionalProperties")
    found = []
    for key, value in doc.items():
        sub = props.get(key) if props else extra if isinstance(extra, dict) else None
        if sub is None:
            found.append(f"{path}.{key}")
        else:
            found += _unknown_fields(value, sub, f"{path}.{key}")
    return found


def test_the_kubernetes_spec_is_a_valid_gpu_dask_cluster() -> None:
    import dask_kubernetes.operator  # registers its DaskCluster object with kr8s
    import jsonschema
    from kr8s.asyncio.objects import object_from_spec

    doc = yaml.safe_load((CLUSTERS / "kubernetes.yaml").read_text())
    crds = Path(dask_kubernetes.__file__).parent / "operator/deployment/helm" \
        / "dask-kubernetes-operator/crds/daskcluster.yaml"
    [version] = yaml.safe_load(crds.read_text())["spec"]["versions"]
    schema = version["schema"]["openAPIV3Schema"]
    jsonschema.validate(doc, schema)  # what the API server checks on `kubectl apply`
    # apiVersion, kind and metadata are every object's; the CRD describes the spec.
    assert _unknown_fields(doc["spec"], schema["properties"]["spec"], "spec") == []
    # The operator's own object for it, built without contacting a cluster.
    cluster = object_from_spec(doc)
    assert (cluster.kind, cluster.name, cluster.replicas) == ("DaskCluster", "rebound", 3)
    [worker] = doc["spec"]["worker"]["spec"]["containers"]
    assert all(flag in " ".join(worker["args"]) for flag in WORKER_FLAGS)
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1"
    env = {e["name"]: e["value"] for e in worker["env"]}
    assert env["PREFECT_API_URL"].startswith("http://") and "127.0.0.1" not in env["PREFECT_API_URL"]


def test_the_shell_recipe_starts_workers_as_rebound_needs() -> None:
    script = CLUSTERS / "machines.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = " ".join(script.read_text().split())
    assert all(flag in text for flag in WORKER_FLAGS)
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert usage.returncode == 2 and "usage" in usage.stderr


@pytest.mark.slow
@pytest.mark.timeout(600)  # the data-parallel reference run (fixture set-up) counts here too
def test_ranks_and_a_spare_on_an_existing_scheduler_survive_a_killed_worker(
        dp_reference: dict[str, Any], workdir: Path, corpus: Path) -> None:
    cluster = CommandLineCluster(workdir / "cluster", n_workers=3)
    try:
        from distributed import Client

        with Client(cluster.address, set_as_default=False) as client:
            started = set(client.scheduler_info(n_workers=-1)["workers"])
        rc, err, summary = dp._kill_ranks_mid_group(
            workdir, corpus, "multi", (1,), signal.SIGKILL,
            "--cluster", cluster.address, "--spares", "1")
    finally:
        cluster.close()
    assert rc == 0, err[-3000:]
    [failure] = summary["failures"]
    assert failure["kind"] == "worker-lost" and failure["step"] > 20
    assert failure["restored_from"] == "peer"  # the spare took the rank from its peer's memory
    # Every rank trained on the operator's workers: the two it started with and the spare.
    assert {r["worker"] for r in summary["ranks"]} <= started
    assert failure["worker"] in started
    assert summary["state_hash"] == dp_reference["state_hash"]


LOCAL_SPEC = """
from distributed import LocalCluster


def make_cluster():
    # A real manager on one machine, standing in for a SLURMCluster: both are SpecClusters.
    return LocalCluster(n_workers=0, threads_per_worker=1, processes=True, host="127.0.0.1",
                        dashboard_address="127.0.0.1:0", preload=["tasks.preload"])
"""


@pytest.mark.slow
def test_a_cluster_built_from_a_spec_replaces_a_quarantined_worker(
        reference: dict[str, Any], tmp_path: Path, corpus: Path) -> None:
    spec = tmp_path / "local_spec.py"
    spec.write_text(LOCAL_SPEC)
    summary_path = tmp_path / "summary.json"
    proc = subprocess.Popen(
        [sys.executable, str(CLUSTERS / "managed.py"), str(spec), "--", "--no-progress",
         *cli_args(tmp_path / "store", corpus, "managed", "--chaos", "fail-probe@23",
                   "--summary-json", str(summary_path))],
        cwd=tmp_path, start_new_session=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    try:
        _, err = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        kill_group(proc)
    assert proc.returncode == 0, err[-3000:]
    summary = read_summary(summary_path)
    # The flow found the spec's cluster as its manager and had it start a worker in place of
    # the quarantined one (on a bare --cluster it would only wait for one to join).
    [quarantined] = summary["redundancy"]["quarantined"]
    _quarantined_and_replaced(summary, quarantined["worker"])
    assert "asked the cluster for a worker" in err
    assert summary["state_hash"] == reference["state_hash"]
