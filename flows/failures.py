"""The failure timeline of a run, rebuilt from what the tasks and the scheduler recorded.

Prefect does not count a task rerun after its worker died (STACK-NOTES), so the tasks write one
attempt record each (when it started, which checkpoint it resumed from, when it completed its
first step, the checkpoints it committed, the corrupt checkpoints it passed over) and one record
per chaos event fired; the flow's cluster watch adds the scheduler's `remove-worker` events (and
when the flow heard of them), hung groups it restarted and KilledWorker resubmissions. Each
failure is paired with the first attempt that started after it: that gives detection, recovery,
lost steps. These records outlive a task that raises and an epoch that fails, so a failed run's
summary tells the same story as a completed one's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flows.report import RunTally
from storage import StoreError
from storage.store import CheckpointStore

# Events that strike after their step completed (the step's checkpoint is what fails); the others
# strike as the step starts, so one step fewer was done.
_AFTER_STEP = {"kill-during-save", "kill-before-commit", "corrupt-latest"}

# How a chaos event shows itself to the flow: the observation that counts as its detection.
_DETECTED_BY = {"kill-worker": "loss", "kill-during-save": "loss", "kill-before-commit": "loss",
                "hang": "hang"}


@dataclass
class Failure:
    """One failure: the public entry of DESIGN.md section 4, and when it cost time."""

    entry: dict[str, Any]
    failed_unix: float
    ready_unix: float | None
    """When the attempt that took over was ready to train (None: none did)."""


def _first_after(items: list[dict[str, Any]], key: str, unix: float) -> dict[str, Any] | None:
    return next((i for i in sorted(items, key=lambda i: i[key]) if i[key] >= unix), None)


def _restored_from(retry: dict[str, Any] | None) -> str | None:
    if retry is None or retry.get("resumed_from_step") is None or retry.get("warm"):
        return None
    return "checkpoint"


def _failure(kind: str, step: int | None, worker: str | None, failed_unix: float,
             detected_unix: float | None, retry: dict[str, Any] | None,
             lost: int | None = None) -> Failure:
    """One failure; lost_steps = steps done before it that had to be trained again."""
    detected = recovered = None
    if retry is not None:
        back = retry.get("first_step_unix") or retry.get("ready_unix") or retry["started_unix"]
        recovered = round(back - failed_unix, 3)
        detected = round((detected_unix or retry["started_unix"]) - failed_unix, 3)
        if step is not None and lost is None:
            done = step if kind in _AFTER_STEP else step - 1
            # A failed probe stops its group before it trains: nothing of it is lost.
            lost = 0 if kind == "fail-probe" else max(0, done - (retry.get("resumed_from_step") or 0))
    elif detected_unix is not None:
        detected = round(detected_unix - failed_unix, 3)
    entry = {"kind": kind, "step": step, "worker": worker, "detected_after_s": detected,
             "recovered_after_s": recovered, "lost_steps": lost,
             "restored_from": _restored_from(retry), "at_unix": round(failed_unix, 3)}
    return Failure(entry, failed_unix, retry.get("ready_unix") if retry else None)


def run_attempts(store: CheckpointStore, run_id: str, since_unix: float) -> list[dict[str, Any]]:
    """The attempt records of this invocation, oldest first."""
    docs = [doc | {"name": name} for name, doc in store.list_json(run_id, "attempts")
            if doc.get("started_unix", 0) >= since_unix]
    return sorted(docs, key=lambda d: d["started_unix"])


def committed_steps(store: CheckpointStore, run_id: str, since_unix: float,
                    attempts: list[dict[str, Any]]) -> list[int]:
    """Steps this invocation committed: the tasks' records of their commits, and the committed
    checkpoints made since (a record lost with a full disk; a commit gc has deleted since)."""
    steps = {int(s) for a in attempts for s in a.get("checkpoints", [])}
    try:
        for step in store.steps(run_id):
            try:
                created = store.read_manifest(run_id, step)[0].created_unix
            except StoreError:
                continue  # corrupt or deleted meanwhile: not ours to count by its stamp
            if created >= since_unix:
                steps.add(step)
    except StoreError:
        pass  # the store is the problem: the records are what we have
    return sorted(steps)


def _corrupt_found(tally: RunTally | None, attempts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every corrupt checkpoint found (by the resume, an evaluation or a task), once each."""
    found: dict[tuple, dict[str, Any]] = {}
    sources = [c | {"worker": None} for c in (tally.corrupt_found if tally else [])]
    sources += [c | {"worker": a.get("worker"), "attempt": a} for a in attempts
                for c in a.get("corrupt", [])]
    for c in sorted(sources, key=lambda c: c["found_unix"]):
        key = (c["step"], c.get("array"), c.get("chunk"))
        if key not in found:
            found[key] = dict(c)
        elif found[key].get("fell_back_to") is None and c.get("fell_back_to") is not None:
            found[key]["fell_back_to"] = c["fell_back_to"]
            found[key].setdefault("attempt", c.get("attempt"))
    return list(found.values())


def collect_failures(store: CheckpointStore, run_id: str, since_unix: float,
                     tally: RunTally | None = None,
                     attempts: list[dict[str, Any]] | None = None) -> list[Failure]:
    """Failures of this invocation, oldest first (DESIGN.md section 4 `failures`)."""
    fired = [doc | {"name": name} for name, doc in store.list_json(run_id, "chaos")
             if doc.get("fired_unix", 0) >= since_unix]
    if attempts is None:
        attempts = run_attempts(store, run_id, since_unix)
    losses = [dict(w) for w in (tally.worker_losses if tally else [])]
    hangs = [dict(h) for h in (tally.hangs if tally else [])]
    for hang in hangs:
        # Restarting a hung worker removes it: that removal is the cure, not another failure.
        restart = next((w for w in losses if w["worker"] == hang["worker"]
                        and w["removed_unix"] >= hang["detected_unix"]), None)
        if restart is not None:
            losses.remove(restart)
    failures: list[Failure] = []
    corrupt = _corrupt_found(tally, attempts)
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
                # Death (the kill) to the flow hearing of it.
                detected_unix = seen.get("noticed_unix") or seen["removed_unix"]
        elif source == "hang":
            seen = _first_after(hangs, "detected_unix", at)
            if seen is not None:
                hangs.remove(seen)
                detected_unix = seen["detected_unix"]
        extra: dict[str, Any] = {}
        if kind == "corrupt-latest":
            # The injected rot, once found: say where it was, and don't list it twice.
            match = next((c for c in corrupt if c["step"] == step), None)
            if match is not None:
                corrupt.remove(match)
                detected_unix = match["found_unix"]
                extra = {"array": match.get("array"), "chunk": match.get("chunk")}
        retry = _first_after(attempts, "started_unix", at)
        failure = _failure(kind, step, event.get("worker"), at, detected_unix, retry)
        failure.entry.update(extra)
        failures.append(failure)
    for c in corrupt:
        # Found on resume, by an evaluation or by a task's load; the rot itself is older than
        # anything we can date, so detection counts from when it was read.
        back_to = c.get("fell_back_to")
        retry = c.get("attempt") or _first_after(attempts, "started_unix", c["found_unix"])
        failure = _failure("corrupt-checkpoint", c["step"], c.get("worker"), c["found_unix"],
                           c["found_unix"], retry, lost=c["step"] - (back_to or 0))
        failure.entry.update(array=c.get("array"), chunk=c.get("chunk"), reason=c.get("reason"))
        failures.append(failure)
    # What no chaos event explains: real failures.
    for loss in losses:
        if loss.get("processing"):
            # Death is dated by the worker's last progress event (it was alive then, a step
            # before at most); detection ends when this flow heard of the removal.
            died = loss.get("last_seen_unix") or loss["removed_unix"]
            retry = _first_after(attempts, "started_unix", died)
            # It died training the step after its last reported one: what it had done since
            # the checkpoint its replacement resumed from is lost.
            last = loss.get("last_step")
            failures.append(_failure("worker-lost", None if last is None else last + 1, loss["worker"],
                                     died, loss.get("noticed_unix") or loss["removed_unix"], retry))
    for hang in hangs:
        retry = _first_after(attempts, "started_unix", hang["detected_unix"])
        failures.append(_failure("hang", None, hang["worker"], hang["detected_unix"],
                                 hang["detected_unix"], retry))
    for infra in (tally.infra_failures if tally else []):
        if "chaos: " in infra["reason"]:
            continue  # an injected failure, already listed from its chaos record
        retry = _first_after(attempts, "started_unix", infra["unix"])
        failure = _failure(infra.get("kind", "killed-worker"), None, None, infra["unix"],
                           infra["unix"], retry)
        failure.entry["reason"] = infra["reason"]
        failures.append(failure)
    for error in (tally.errors if tally else []):
        if "chaos: " in error["reason"]:
            continue  # an injected failure, already listed from its chaos record
        # A group that failed past its retries (the epoch is retried), or a storage that
        # refuses (the run fails): whatever attempt started after it is its recovery.
        retry = _first_after(attempts, "started_unix", error["unix"])
        failure = _failure(error["kind"], None, None, error["unix"], error["unix"], retry)
        failure.entry["reason"] = error["reason"]
        failures.append(failure)
    return sorted(failures, key=lambda f: f.failed_unix)
