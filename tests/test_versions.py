"""Issue 7 (16): the dependency ranges are the tested ones, stated once for pip and checked at
start-up, so an unsupported Prefect or Dask fails with one line instead of misbehaving."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from flows.versions import SUPPORTED, UnsupportedVersion, check_versions, installed_versions
from tests.cli_helpers import ROOT


def test_installed_versions_are_supported() -> None:
    check_versions()  # raises on this machine's packages if they were outside the ranges
    assert all(installed_versions().values())


@pytest.mark.parametrize("name, old", [("prefect", "3.4.0"), ("distributed", "2025.1.0"),
                                       ("distributed", "2025.3.0"), ("prefect", "3.10.0"),
                                       ("prefect-dask", "0.3.5"), ("dask", "2027.1.0")])
def test_unsupported_versions_are_refused_naming_package_and_range(name: str, old: str) -> None:
    versions = {**installed_versions(), name: old}
    with pytest.raises(UnsupportedVersion) as err:
        check_versions(versions)
    message = str(err.value)
    assert "\n" not in message
    assert f"{name} {old} is installed" in message and SUPPORTED[name] in message


def test_missing_package_is_refused() -> None:
    with pytest.raises(UnsupportedVersion, match="prefect is not installed"):
        check_versions({**installed_versions(), "prefect": None})


def test_pyproject_states_the_checked_ranges() -> None:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    stated = {Requirement(d).name: SpecifierSet(str(Requirement(d).specifier)) for d in deps}
    for name, spec in SUPPORTED.items():
        assert stated.get(name) == SpecifierSet(spec), (name, stated.get(name), spec)


def test_cli_refuses_an_unsupported_prefect_with_one_line(tmp_path: Path) -> None:
    # A real distribution record that shadows the installed one: importlib.metadata reads the
    # first match on sys.path, as it would after `pip install prefect==3.4.0`.
    dist = tmp_path / "prefect-3.4.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: prefect\nVersion: 3.4.0\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "REBOUND_HOME": str(tmp_path / "home")}
    store = tmp_path / "store"
    done = subprocess.run([sys.executable, "-m", "flows.train", "--model", "tiny", "--store",
                           str(store)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == [f"error: prefect 3.4.0 is installed; Rebound needs prefect{SUPPORTED['prefect']}"
                     f" (pip install 'prefect{SUPPORTED['prefect']}')"], done.stderr
    assert not store.exists()
