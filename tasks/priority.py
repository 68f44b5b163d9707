"""Process priority for booting workers: a worker restarted after a crash must not slow the
spare that is taking over its work.

The process that starts a LocalCluster lowers its own priority first, so the worker processes
it spawns (and respawns after a crash) boot at low priority (`import torch`, Prefect, AdamW
warm-up: seconds of CPU); a worker's preload lowers itself too (for workers started elsewhere)
and restores normal priority once it is warm. The coordinator stays low: it is mostly idle. Linux keeps a nice value per thread, so every thread
is set. Without the privilege to raise priority again (not root), a worker stays at the lower
priority, which only matters against other programs on the same machine.
"""

from __future__ import annotations

import os

BOOT_NICENESS = 10


def _set_all_threads(niceness: int) -> None:
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, niceness)
        except (OSError, AttributeError):
            pass


def lower_for_boot() -> None:
    """Lower this process's priority (all threads); children inherit it."""
    _set_all_threads(BOOT_NICENESS)


def restore_normal() -> None:
    """Back to normal priority (all threads), where permitted."""
    _set_all_threads(0)
