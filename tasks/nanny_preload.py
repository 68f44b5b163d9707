"""Dask nanny preload: worker processes this nanny starts boot at low priority (see priority)."""

from __future__ import annotations

from tasks.priority import lower_for_boot


def dask_setup(nanny: object) -> None:
    """Called by Dask when the nanny starts."""
    lower_for_boot()
