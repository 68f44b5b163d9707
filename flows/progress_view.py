"""Local UX: a rich progress bar fed by the workers' per-step events."""

from __future__ import annotations

import time
from typing import Any

from distributed import Client
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from flows.redundancy import REDUNDANCY_TOPIC
from tasks.progress import PROGRESS_TOPIC


class ProgressView:
    """Shows step, loss, tokens/s and the last checkpoint; a no-op when disabled."""

    def __init__(self, console: Console, run_id: str, total_steps: int, start_step: int,
                 enabled: bool = True) -> None:
        self.run_id = run_id
        self._enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
            TextColumn("ckpt {task.fields[ckpt]}"), TextColumn("{task.fields[ranks]}"),
            TextColumn("{task.fields[redundancy]}"), TimeElapsedColumn(),
            console=console, disable=not enabled, transient=False)
        self._task = self._progress.add_task(run_id, total=total_steps, completed=start_step,
                                             loss="-", tps="-", ckpt="-", ranks="",
                                             redundancy="")
        self._rank_workers: dict[int, str] = {}
        self._window: list[tuple[float, int]] = []
        self._client: Client | None = None

    def __enter__(self) -> ProgressView:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._detach()
        self._progress.stop()

    def _detach(self) -> None:
        if self._client is None:
            return
        try:
            self._client.unsubscribe_topic(PROGRESS_TOPIC)
            self._client.unsubscribe_topic(REDUNDANCY_TOPIC)
        except Exception:  # noqa: BLE001 - the cluster may already be gone
            pass
        self._client.close(timeout=2)
        self._client = None

    def attach(self, scheduler_address: str) -> None:
        """Listen to the cluster's progress events (no-op when disabled); a second call moves
        to another cluster (the run healed onto it, flows.cluster.CLUSTER_LISTENERS)."""
        if not self._enabled:
            return
        self._detach()
        self._client = Client(scheduler_address, timeout="30s", set_as_default=False)
        self._client.subscribe_topic(PROGRESS_TOPIC, self._on_event)
        self._client.subscribe_topic(REDUNDANCY_TOPIC, self._on_redundancy)

    def _on_redundancy(self, event: tuple[float, dict[str, Any]]) -> None:
        """The flow's redundancy state (flows/redundancy.py): spares and quarantined counts."""
        _, msg = event
        if msg.get("run_id") != self.run_id:
            return
        holding = max(1, len(self._rank_workers))
        line = (f"{msg['standby']} · spares {max(0, msg['workers'] - holding)} · "
                f"quarantined {msg['quarantined']}")
        if msg.get("replacing"):
            line += f" · replacing {msg['replacing']}"
        self._progress.update(self._task, redundancy=line)

    def _on_event(self, event: tuple[float, dict[str, Any]]) -> None:
        _, msg = event
        if msg.get("run_id") != self.run_id or "loss" not in msg:
            return
        if "rank" in msg:
            # Every rank reports its own share of tokens: the sum is the model's throughput.
            self._rank_workers[int(msg["rank"])] = str(msg.get("worker", "?"))
        now = time.monotonic()
        self._window = [(t, n) for t, n in self._window if now - t < 10.0]
        self._window.append((now, int(msg.get("tokens", 0))))
        span = now - self._window[0][0]
        tps = sum(n for _, n in self._window) / span if span > 0 else 0.0
        self._progress.update(self._task, completed=int(msg["step"]),
                              loss=f"{float(msg['loss']):.3f}", tps=f"{tps:,.0f}",
                              ckpt=str(msg.get("ckpt") if msg.get("ckpt") is not None else "-"),
                              ranks=f"{len(self._rank_workers)} ranks"
                              if len(self._rank_workers) > 1 else "")

    def set_step(self, step: int, ckpt: int | None = None) -> None:
        self._progress.update(self._task, completed=step,
                              ckpt=str(ckpt) if ckpt is not None else "-")
