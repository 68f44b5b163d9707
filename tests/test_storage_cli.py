"""``python -m storage`` through real subprocesses: output, --json and exit codes; and the
layering rule that storage imports neither Prefect nor Dask."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from storage_helpers import ROOT, chunk_files, env_for_child, flip_byte, run_storage_cli

from storage import open_store, state_hash


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli-store")
    store = open_store(str(root), chunk_bytes=256)
    for s in (1, 2, 3):
        store.save("good", s, {"model/w": torch.full((8, 8), float(s)), "optim/t": torch.tensor(s)}, {"step": s})
    store.save("bad", 1, {"model/w": torch.ones(8, 8)}, {"step": 1})
    store.save("bad", 2, {"model/w": torch.ones(8, 8)}, {"step": 2})
    flip_byte(chunk_files(root, "bad", 2)[0], 3)
    return root


def test_list(store_dir: Path) -> None:
    r = run_storage_cli("list", str(store_dir))
    assert r.returncode == 0 and "good" in r.stdout and "bad" in r.stdout
    r = run_storage_cli("list", str(store_dir), "good", "--json")
    assert r.returncode == 0
    assert [c["step"] for c in json.loads(r.stdout)["checkpoints"]] == [1, 2, 3]


def test_verify_ok_corrupt_and_usage(store_dir: Path) -> None:
    r = run_storage_cli("verify", str(store_dir), "good")
    assert r.returncode == 0 and r.stdout.count("OK") == 3
    r = run_storage_cli("verify", str(store_dir), "bad", "--json")
    assert r.returncode == 1
    doc = json.loads(r.stdout)
    assert doc["ok"] is False
    (bad,) = [c for c in doc["checkpoints"] if not c["ok"]]
    assert bad["step"] == 2 and bad["problems"][0]["array"] == "model/w" and bad["problems"][0]["chunk"] == "c/0/0"
    r = run_storage_cli("verify", str(store_dir))  # every run: one corrupt -> 1, bad chunk named
    assert r.returncode == 1 and "array=model/w chunk=c/0/0" in r.stdout
    r = run_storage_cli("verify", str(store_dir), "good", "latest")
    assert r.returncode == 0 and "good@3" in r.stdout
    for args in (("nosuchrun",), ("good", "99"), ("good", "notastep")):
        r = run_storage_cli("verify", str(store_dir), *args)
        assert r.returncode == 2, args
        assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert run_storage_cli("verify", str(store_dir / "missing")).returncode == 2
    assert run_storage_cli("frobnicate", str(store_dir)).returncode == 2
    assert run_storage_cli().returncode == 2


def test_inspect_prints_the_state_hash(store_dir: Path) -> None:
    want = state_hash({"model/w": torch.full((8, 8), 3.0), "optim/t": torch.tensor(3)})
    r = run_storage_cli("inspect", str(store_dir), "good", "latest")
    assert r.returncode == 0 and want in r.stdout and '"step": 3' in r.stdout
    r = run_storage_cli("inspect", str(store_dir), "good", "2", "--json")
    doc = json.loads(r.stdout)
    assert doc["metadata"] == {"step": 2} and doc["verified"] is True and len(doc["state_hash"]) == 32
    r = run_storage_cli("inspect", str(store_dir), "bad", "2")
    assert r.returncode == 1


def test_export_and_gc(store_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "w.pt"
    r = run_storage_cli("export", str(store_dir), "good", "2", "--format", "torch", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert torch.equal(torch.load(out, weights_only=True)["model/w"], torch.full((8, 8), 2.0))
    assert run_storage_cli("export", str(store_dir), "good", "2", "--format", "zip", "--out", str(out)).returncode == 2
    assert run_storage_cli("export", str(store_dir), "bad", "2", "--out", str(tmp_path / "x")).returncode == 1
    assert run_storage_cli("gc", str(store_dir), "good", "--keep-last", "0").returncode == 2
    r = run_storage_cli("gc", str(store_dir), "bad", "--keep-last", "1", "--json")
    assert r.returncode == 0
    assert json.loads(r.stdout) == {"run_id": "bad", "deleted": [], "kept": [1, 2]}  # 1 is newest verified


def test_storage_imports_neither_prefect_nor_dask() -> None:
    code = (
        "import sys, storage, storage.cli, storage.store, storage.localfs, storage.fsspecfs, storage.export\n"
        "from storage import open_store, state_hash\n"
        "import numpy as np, tempfile\n"
        "s = open_store(tempfile.mkdtemp()); s.save('r', 1, {'a': np.zeros(3)}, {}); s.load('r', 1)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'dask', 'distributed', "
        "'prefect_dask'))\n"
        "print(bad)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env_for_child(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
