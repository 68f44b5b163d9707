"""The coordinator plans and submits; it never trains. Importing torch costs ~1.8 s of start-up
on one core, so a single-rank coordinator must not (issue 11, start-up): only the workers do."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.cli_helpers import ROOT

PROBE = """
import os, sys
import flows.cli, flows.train
from flows.params import TrainParams
from flows.plan import build_plan
import flows.kept_cluster
from flows.gpu_probe import GPU_DRIVER_PATHS, cuda_available
plan = build_plan(TrainParams(model="tiny", data=sys.argv[1], steps=40))
assert plan.run.config_hash and plan.groups
if not any(os.path.exists(p) for p in GPU_DRIVER_PATHS):
    assert cuda_available() is False
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""


def test_the_coordinator_imports_no_torch(corpus: Path) -> None:
    # What the coordinator of a single-rank run does before it submits: parse, plan (corpus,
    # config hash, groups), decide on GPU workers.
    done = subprocess.run([sys.executable, "-c", PROBE, str(corpus)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]", done.stdout


def test_the_training_package_still_offers_its_names() -> None:
    import training

    assert training.Trainer.__module__ == "training.loop"
    assert training.ModelConfig is training.get_preset("tiny").__class__
    assert "Trainer" in dir(training) or "Trainer" in training.__all__
