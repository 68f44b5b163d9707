"""The failure timeline of a run, rebuilt from what the tasks and the scheduler recorded.

Prefect does not count a task rerun after its worker died (STACK-NOTES), so the tasks write one
attempt record each (when it started, which checkpoint it resumed from, when it completed its
first step) and one record per chaos event fired; the flow's cluster watch adds the scheduler's
`remove-worker` events, hung groups it restarted and KilledWorker resubmissions. Each failure is
paired with the first attempt that started after it: that gives detection, recovery, lost steps.
"""

from __future__ import annotations

from typing import Any

from flows.report import RunTally
from storage.store import CheckpointStore

# Events that strike after their step completed (the step's checkpoint is what fails); the others
# strike as the step starts, so one step fewer was done.
_AFTER_STEP = {"kill-during-save", "corrupt-latest"}

# How a chaos event shows itself to the flow: the observation that counts as its detection.
_DETECTED_BY = {"kill-worker": "loss", "kill-during-save": "loss", "hang": "hang"}


def _first_after(items: list[dict[str, Any]], key: str, unix: float) -> dict[str, Any] | None:
    return next((i for i in sorted(items, key=lambda i: i[key]) if i[key] >= unix), None)


def _entry(kind: str, step: int | None, worker: str | None, failed_unix: float,
           detected_unix: float | None, retry: dict[str, Any] | None) -> dict[str, Any]:
    """One failure; lost_steps = steps done before it that had to be trained again."""
    detected = recovered = lost = None
    if retry is not None:
        back = retry.get("first_step_unix") or retry.get("ready_unix") or retry["started_unix"]
        recovered = round(back - failed_unix, 3)
        detected = round((detected_unix or retry["started_unix"]) - failed_unix, 3)
        if step is not None:
            done = step if kind in _AFTER_STEP else step - 1
            # A failed probe stops its group before it trains: nothing of it is lost.
            lost = 0 if kind == "fail-probe" else max(0, done - (retry.get("resumed_from_step") or 0))
    return {"kind": kind, "step": step, "worker": worker, "detected_after_s": detected,
            "recovered_after_s": recovered, "lost_steps": lost}


def collect_failures(store: CheckpointStore, run_id: str, since_unix: float,
                     tally: RunTally | None = None) -> list[dict[str, Any]]:
    """Failures of this invocation, oldest first (DESIGN.md section 4 `failures`)."""
    fired = [doc | {"name": name} for name, doc in store.list_json(run_id, "chaos")
             if doc.get("fired_unix", 0) >= since_unix]
    attempts = [doc for _, doc in store.list_json(run_id, "attempts")
                if doc.get("started_unix", 0) >= since_unix]
    losses = [dict(w) for w in (tally.worker_losses if tally else [])]
    hangs = [dict(h) for h in (tally.hangs if tally else [])]
    for hang in hangs:
        # Restarting a hung worker removes it: that removal is the cure, not another failure.
        restart = next((w for w in losses if w["worker"] == hang["worker"]
                        and w["removed_unix"] >= hang["detected_unix"]), None)
        if restart is not None:
            losses.remove(restart)
    failures: list[dict[str, Any]] = []
    for event in sorted(fired, key=lambda d: d["fired_unix"]):
        kind, _, step_text = event["name"].removeprefix("chaos/").partition("@")
        step = int(step_text)
        at = event["fired_unix"]
        detected_unix = None
        source = _DETECTED_BY.get(kind)
        if source == "loss":
            seen = _first_after(losses, "removed_unix", at)
            if seen is not None:
                losses.remove(seen)
                detected_unix = seen["removed_unix"]
        elif source == "hang":
            seen = _first_after(hangs, "detected_unix", at)
            if seen is not None:
                hangs.remove(seen)
                detected_unix = seen["detected_unix"]
        retry = _first_after(attempts, "started_unix", at)
        failures.append(_entry(kind, step, event.get("worker"), at, detected_unix, retry))
    # What no chaos event explains: real failures.
    for loss in losses:
        if loss.get("processing"):
            retry = _first_after(attempts, "started_unix", loss["removed_unix"])
            failures.append(_entry("worker-lost", None, loss["worker"], loss["removed_unix"],
                                   loss["removed_unix"], retry))
    for hang in hangs:
        retry = _first_after(attempts, "started_unix", hang["detected_unix"])
        failures.append(_entry("hang", None, hang["worker"], hang["detected_unix"],
                               hang["detected_unix"], retry))
    for infra in (tally.infra_failures if tally else []):
        if "chaos: " in infra["reason"]:
            continue  # an injected failure, already listed from its chaos record
        retry = _first_after(attempts, "started_unix", infra["unix"])
        failures.append(_entry(infra.get("kind", "killed-worker"), None, None, infra["unix"],
                               infra["unix"], retry) | {"reason": infra["reason"]})
    return failures
