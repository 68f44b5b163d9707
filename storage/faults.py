"""Fault-injection points for crash tests (real SIGKILL of the writing process).

Set ``REBOUND_STORAGE_FAULT`` in a writer's environment:
``chunks:N`` kills it right after its N-th chunk file is written, ``before-manifest``,
``before-commit`` (staging complete, commit not begun), ``before-rename`` (marker written, not
yet published) or ``after-rename`` (published, parent folder not yet fsynced);
``existing-no-marker`` is where a save has just found no commit marker for its step;
``mid-copy`` (fsspec) is after the first file is copied into the step folder;
``share-written`` is where a sharded save's rank has written its share, not yet made it durable.
``barrier:POINT:DIR:N`` does not kill: it makes N writers meet at POINT (each drops a file in
DIR and waits for N files) so a race test really races; writers may meet at different points.
Unset, every point is a dictionary lookup and nothing else.
"""

from __future__ import annotations

import os
import signal
import time
import uuid

ENV = "REBOUND_STORAGE_FAULT"


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def point(name: str) -> None:
    """Die here (or meet other writers here) if the environment asks for it."""
    spec = os.environ.get(ENV)
    if spec is None:
        return
    if spec == name:
        _die()
    if spec.startswith(f"barrier:{name}:"):
        folder, count = spec.split(":", 2)[2].rsplit(":", 1)
        _barrier(folder, int(count))


def _barrier(folder: str, count: int, timeout_s: float = 20.0) -> None:
    os.makedirs(folder, exist_ok=True)
    open(os.path.join(folder, uuid.uuid4().hex), "w").close()
    deadline = time.monotonic() + timeout_s
    while len(os.listdir(folder)) < count and time.monotonic() < deadline:
        time.sleep(0.005)


def after_chunks(count: int) -> None:
    """Die once ``count`` chunk files have been written, if asked to."""
    spec = os.environ.get(ENV, "")
    if spec.startswith("chunks:") and count >= int(spec.split(":", 1)[1]):
        _die()
