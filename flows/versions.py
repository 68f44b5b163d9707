"""The dependency versions Rebound is tested with, checked at start-up.

The flows lean on behaviour that changes between releases without an error: Dask's
`scheduler_info(n_workers=-1)` (older releases swallow the TypeError inside the watcher and
never see a worker loss), scheduler task states read through `run_on_scheduler`, and the
command and environment Prefect's own temporary server runs with. So each range is what the
test suite ran against, and pyproject.toml states the same ranges (a test keeps them equal).
Widening a range means running the suite on the new version first.
"""

from __future__ import annotations

from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

SUPPORTED: dict[str, str] = {
    # 3.9.1 is what the suite ran on; the temporary server's uvicorn command and environment
    # (flows/prefect_env.py) follow Prefect's own, which moves between minor releases.
    "prefect": ">=3.9.1,<3.10",
    "prefect-dask": ">=0.3.7,<0.4",
    # scheduler_info(n_workers=) appeared in 2025.4.0 (dask/distributed#9045); scheduler
    # internals read by flows/supervise.py are only tested on 2026.8.
    "dask": ">=2026.8.0,<2026.9",
    "distributed": ">=2026.8.0,<2026.9",
}


class UnsupportedVersion(RuntimeError):
    """An installed dependency is outside the range Rebound is tested with."""


def installed_versions() -> dict[str, str | None]:
    """The installed version of each checked package (None when it is missing)."""
    found: dict[str, str | None] = {}
    for name in SUPPORTED:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def check_versions(installed: Mapping[str, str | None] | None = None) -> None:
    """Raise UnsupportedVersion (one line naming the package and the range) on a mismatch."""
    installed = installed_versions() if installed is None else installed
    for name, spec in SUPPORTED.items():
        have = installed.get(name)
        try:
            ok = have is not None and Version(have) in SpecifierSet(spec)
        except InvalidVersion:
            ok = False
        if not ok:
            found = "is not installed" if have is None else f"{have} is installed"
            raise UnsupportedVersion(f"{name} {found}; Rebound needs {name}{spec} "
                                     f"(pip install '{name}{spec}')")
