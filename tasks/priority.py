"""Process priority for booting workers: a worker restarted after a crash must not slow the
spare that is taking over its work.

The heavy part of a worker's start-up (`import torch`, Prefect, AdamW's first use: seconds of
CPU) runs in a thread of its own at the lowest priority, and only that thread is lowered:
Linux keeps a nice value per thread, and a new thread inherits its creator's. The worker's own
threads (its event loop, and the executor thread that later runs training, created from it)
never leave normal priority, so nothing has to be raised back afterwards. Raising it back is
what an unprivileged process cannot do (RLIMIT_NICE is 0 by default): the earlier scheme,
lowering every thread and restoring them once warm, left a whole run training at nice 19
without root. (Lowering the coordinator instead, so that workers would boot low from their
first instruction, halved recovery time again but cost ~7% of steady-state throughput:
measured, bench.overhead 1.07 -> 1.14; not done.)
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

BOOT_NICENESS = 19
"""A booting worker takes only what training leaves over."""

BOOT_PRIORITY_ENV = "REBOUND_BOOT_PRIORITY"
"""Set to "normal" in a worker's environment, it boots at normal priority (cold standby: the
worker started after a failure is the one the run waits for; tasks/preload.py)."""


def _lower_this_thread(niceness: int) -> None:
    try:
        # PRIO_PROCESS with a thread id: on Linux, exactly that thread.
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
    except (OSError, AttributeError):
        pass  # not Linux, or not permitted: boot at normal priority


def run_at_low_priority(work: Callable[[], None]) -> None:
    """Run work() in a thread of its own at BOOT_NICENESS and wait for it; its error is raised
    here. Threads that work() starts inherit the low priority: keep long-lived ones out of it."""
    errors: list[BaseException] = []

    def boot() -> None:
        _lower_this_thread(BOOT_NICENESS)
        try:
            work()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(err)

    thread = threading.Thread(target=boot, name="rebound-boot", daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
