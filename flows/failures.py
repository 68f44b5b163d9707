"""The failure timeline of a run, rebuilt from records the tasks themselves keep in the store.

Prefect does not count a task rerun after its worker died (STACK-NOTES), so the tasks write one
attempt record each (when it started, which checkpoint it resumed from) and one record per chaos
event fired; pairing each failure with the next attempt gives detection, recovery and lost steps.
"""

from __future__ import annotations

from typing import Any

from storage.store import CheckpointStore


def collect_failures(store: CheckpointStore, run_id: str, since_unix: float) -> list[dict[str, Any]]:
    """Failures of this invocation (chaos events fired since since_unix), oldest first."""
    fired = [doc | {"name": name} for name, doc in store.list_json(run_id, "chaos/")
             if doc.get("fired_unix", 0) >= since_unix]
    attempts = sorted((doc for _, doc in store.list_json(run_id, "attempts/")
                       if doc.get("started_unix", 0) >= since_unix),
                      key=lambda d: d["started_unix"])
    failures: list[dict[str, Any]] = []
    for event in sorted(fired, key=lambda d: d["fired_unix"]):
        kind, _, step_text = event["name"].removeprefix("chaos/").partition("@")
        step = int(step_text)
        retry = next((a for a in attempts if a["started_unix"] > event["fired_unix"]), None)
        detected = recovered = lost = None
        if retry is not None:
            detected = round(retry["started_unix"] - event["fired_unix"], 3)
            back = retry.get("first_step_unix") or retry.get("ready_unix") or retry["started_unix"]
            recovered = round(back - event["fired_unix"], 3)
            resumed = retry.get("resumed_from_step") or 0
            lost = max(0, step - 1 - resumed)
        failures.append({"kind": kind, "step": step, "worker": event.get("worker"),
                         "detected_after_s": detected, "recovered_after_s": recovered,
                         "lost_steps": lost})
    return failures
