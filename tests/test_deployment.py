"""prefect.yaml: every deployment's entrypoint loads and its parameters are valid TrainParams."""

from __future__ import annotations

from pathlib import Path

import yaml
from prefect.flows import load_flow_from_entrypoint

from flows.params import TrainParams

ROOT = Path(__file__).resolve().parents[1]


def test_every_deployment_loads_and_validates() -> None:
    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert spec["deployments"]
    for deployment in spec["deployments"]:
        flow = load_flow_from_entrypoint(str(ROOT / deployment["entrypoint"]))
        assert flow.name == "rebound-train"
        params = TrainParams(**deployment["parameters"]["params"])
        assert params.model in ("tiny", "small")
        assert deployment["work_pool"]["name"] == "rebound-process"
        for schedule in deployment.get("schedules", []):
            assert schedule["active"] is False  # shipped off: a user turns it on
