"""Process priority for booting workers: a worker restarted after a crash must not slow the
spare that is taking over its work.

A worker's preload lowers its own priority before the heavy part of its start-up (`import
torch`, Prefect, AdamW warm-up: seconds of CPU) and restores normal priority once it is warm.
(Lowering the coordinator's priority as well, so that workers would boot low from their first
instruction, halved recovery time again but cost ~7% of steady-state throughput: measured,
bench.overhead 1.07 -> 1.14; not done.) Linux keeps a nice value per thread, so every thread
is set. Without the privilege to raise priority again (not root), a worker stays at the lower
priority, which only matters against other programs on the same machine.
"""

from __future__ import annotations

import os

BOOT_NICENESS = 19
"""A booting worker takes only what training leaves over."""


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
