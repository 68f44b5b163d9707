"""Chaos spec (DESIGN.md section 6): parse `KIND@STEP,...` and fire each event once per run.

The record that an event fired lives in the store (`chaos/<kind>@<step>`), created exclusively,
so a task retried after the failure it injected does not inject it again.
"""

from __future__ import annotations

import os
import random
import signal
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

CHAOS_KINDS = (
    "kill-worker",
    "kill-during-save",
    "kill-before-commit",
    "raise",
    "corrupt-latest",
    "hang",
    "perturb-replica",
    "fail-probe",
)


class ChaosError(RuntimeError):
    """The failure a `raise` chaos event injects (retryable like any task error)."""


@dataclass(frozen=True)
class ChaosEvent:
    kind: str
    """One of CHAOS_KINDS."""
    step: int
    """The optimizer step (1-based: the step that completes it) at which the event fires."""
    rank: int = 0
    """Data-parallel rank it strikes (`KIND@STEP/RANK`)."""
    replica: int = 0
    """Replica group it strikes (`KIND@STEP/REPLICA.RANK`)."""

    @property
    def record_name(self) -> str:
        if self.rank == 0 and self.replica == 0:
            return f"chaos/{self.kind}@{self.step}"
        # Another folder: the failure timeline of a single-rank run reads chaos/ only.
        return f"chaos-ranks/{self.kind}@{self.step}-{self.replica}.{self.rank}"


@dataclass(frozen=True)
class ChaosPlan:
    events: tuple[ChaosEvent, ...] = ()
    """Fixed events from the spec."""
    random_p: float = 0.0
    """Probability of one `raise` per batch group (`random:P`), seeded by the run seed."""

    def events_at(self, step: int) -> list[ChaosEvent]:
        """Events of rank 0 of replica 0 at step (what a single-rank group runs)."""
        return [e for e in self.events if e.step == step and e.rank == 0 and e.replica == 0]

    def for_rank(self, rank: int, replica: int = 0) -> list[ChaosEvent]:
        """Every fixed event aimed at one rank."""
        return [e for e in self.events if e.rank == rank and e.replica == replica]

    def random_events(self, seed: int, first_step: int, last_step: int) -> list[ChaosEvent]:
        """The random failure (if any) of the group (first_step, last_step], a pure function of seed."""
        if self.random_p <= 0 or last_step <= first_step:
            return []
        rng = random.Random(f"{seed}:{first_step}:{last_step}")
        if rng.random() >= self.random_p:
            return []
        kind = rng.choice(("raise", "kill-worker"))
        return [ChaosEvent(kind, rng.randint(first_step + 1, last_step))]


def parse_chaos(spec: str | None) -> ChaosPlan:
    """Parse a chaos spec; raises ValueError with one line naming the bad part."""
    if not spec:
        return ChaosPlan()
    events: list[ChaosEvent] = []
    random_p = 0.0
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if part.startswith("random:"):
            try:
                random_p = float(part.removeprefix("random:"))
            except ValueError:
                raise ValueError(f"--chaos: {part!r}: random:P needs a probability") from None
            if not 0.0 <= random_p <= 1.0:
                raise ValueError(f"--chaos: {part!r}: P must be within [0, 1]")
            continue
        kind, sep, step_text = part.partition("@")
        step_text, slash, target = step_text.partition("/")
        replica, rank = 0, 0
        if slash:
            rep_text, dot, rank_text = target.rpartition(".")
            if not rank_text.isdigit() or (dot and not rep_text.isdigit()):
                raise ValueError(f"--chaos: {part!r}: the target is /RANK or /REPLICA.RANK")
            rank, replica = int(rank_text), int(rep_text) if dot else 0
        if not sep or kind not in CHAOS_KINDS:
            raise ValueError(
                f"--chaos: {part!r} is not KIND@STEP with KIND one of {', '.join(CHAOS_KINDS)}"
            )
        if not step_text.isdigit() or int(step_text) < 1:
            raise ValueError(f"--chaos: {part!r}: STEP must be a positive integer")
        events.append(ChaosEvent(kind, int(step_text), rank, replica))
    return ChaosPlan(tuple(events), random_p)


def kill_this_process() -> None:
    """SIGKILL the current process: a real, unannounced death of the worker."""
    os.kill(os.getpid(), signal.SIGKILL)


def hang(duration: timedelta) -> None:
    """Stop making progress (no CPU, no heartbeat of ours) for `duration`."""
    deadline = time.monotonic() + duration.total_seconds()
    while time.monotonic() < deadline:
        time.sleep(0.5)


def flip_byte(checkpoint_dir: str, array: str, chunk_key: str, offset: int) -> str:
    """Flip one byte of a chunk file on disk (bit rot); returns the file's path."""
    path = os.path.join(checkpoint_dir, *array.split("/"), *chunk_key.split("/"))
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0xFF]))
        f.flush()
        os.fsync(f.fileno())
    return path


def rot_largest_chunk(store: Any, ref: Any) -> str:
    """corrupt-latest: flip the middle byte of the first chunk of the checkpoint's largest array
    (bit rot a verified load must find); returns the file's path."""
    manifest, _ = store.read_manifest(ref.run_id, ref.step)
    entry = max(manifest.arrays, key=lambda a: a.layout.data_nbytes)
    chunk = entry.layout.chunks[0]
    return flip_byte(store.checkpoint_url(ref.run_id, ref.step), entry.layout.name, chunk.key,
                     chunk.data_nbytes // 2)
