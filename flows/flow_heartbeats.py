"""Flow-run heartbeats that stop when their flow run ends, not up to a second later.

Prefect's flow engine (3.9) beats from a thread that sleeps in one-second steps and checks its
stop flag between them; at the flow run's end the engine joins that thread, so every flow run
ends 0-1 s after its work did. Rebound runs one subflow per epoch: measured here, a subflow
that trains for 0.1 s took 0.97 s to return, and an epoch boundary of a real run paid ~0.5 s
on average, the run's own flow once more at its end.

Same heartbeats (the first at the start, then every `flows.heartbeat_frequency` seconds, none
after a final state, crash detection by the API unchanged), sent from a thread that waits on
its stop event instead. Installed on import, only where the engine has the pieces this uses:
another Prefect keeps its own.
"""

from __future__ import annotations

import contextvars
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import prefect.flow_engine as flow_engine

JOIN_TIMEOUT_S = 2.0
"""As Prefect's: an emit stuck on the API does not hold the flow run's end longer than this."""


@contextmanager
def send_heartbeats(engine: Any, join_on_exit: bool = True) -> Iterator[None]:
    """prefect.flow_engine._send_heartbeats, stopping at once."""
    heartbeat_seconds = engine.heartbeat_seconds
    if heartbeat_seconds is None:
        yield
        return
    heartbeat_seconds = max(heartbeat_seconds, flow_engine.MINIMUM_HEARTBEAT_INTERVAL)
    resource, related = engine._build_heartbeat_event_template()
    stop = threading.Event()

    def beat() -> None:
        while not stop.is_set():
            run = engine.flow_run
            if run and run.state and run.state.is_final():
                return
            try:
                engine._emit_flow_run_heartbeat(resource, related)
            except Exception:  # noqa: BLE001 - as Prefect's: a missed beat is only logged
                engine.logger.debug("Failed to emit heartbeat", exc_info=True)
            if stop.wait(heartbeat_seconds):
                return

    # The thread sees the caller's SettingsContext (its API URL), as Prefect's does.
    thread = threading.Thread(target=contextvars.copy_context().run, args=(beat,), daemon=True,
                              name="rebound-flow-heartbeat")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        if join_on_exit:
            thread.join(timeout=JOIN_TIMEOUT_S)


def install() -> bool:
    """Use send_heartbeats in Prefect's flow engine; False (nothing changed) where the engine
    lacks what it needs."""
    needs = ("_build_heartbeat_event_template", "_emit_flow_run_heartbeat", "heartbeat_seconds")
    engine_class = getattr(flow_engine, "FlowRunEngine", None)
    if (getattr(flow_engine, "_send_heartbeats", None) is None
            or not hasattr(flow_engine, "MINIMUM_HEARTBEAT_INTERVAL")
            or engine_class is None or not all(hasattr(engine_class, n) for n in needs)):
        return False
    flow_engine._send_heartbeats = send_heartbeats
    return True


INSTALLED = install()
