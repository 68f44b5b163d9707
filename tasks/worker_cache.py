"""What a warm worker keeps between tasks: the corpus and the trainer of the run it last served.

A Dask worker process outlives its tasks, so it has already paid for `import torch`, for the
first AdamW step and for reading the corpus. Keeping the trainer here lets the next batch group
continue from memory when its starting checkpoint is the one this worker committed last.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from storage import CheckpointRef
from training.data import Corpus, load_corpus

if TYPE_CHECKING:
    from training.loop import Trainer

_lock = threading.Lock()
_corpora: dict[str | None, Corpus] = {}
_generation = 0
"""Bumped by every drop: a trainer handed out before a drop can never be put back."""


def current_generation() -> int:
    with _lock:
        return _generation


@dataclass
class WarmTrainer:
    key: tuple[str, str]
    """(run_id, config_hash) the trainer belongs to."""
    trainer: Trainer
    at_ref: CheckpointRef | None
    """The committed checkpoint whose state equals the trainer's memory; None = unknown."""
    productive_s: float = 0.0
    """Training seconds of every step in this state's lineage (carried in checkpoint metadata)."""
    lineage: CheckpointRef | None = None
    """The newest committed checkpoint of this memory's own history: the memory is that state
    trained on from there by this worker, with no failure in between (at_ref is None once the
    memory has moved past it). None when unknown or when the memory must be checked by a load."""
    generation: int = field(default_factory=current_generation)
    """The cache generation this trainer was made or taken in; stale after a drop."""


_warm: WarmTrainer | None = None
_spare: tuple[tuple[str, str], Trainer] | None = None
"""A hot spare's trainer, built before any failure: (run_id, config_hash) -> Trainer."""


def corpus_for(data_path: str | None) -> Corpus:
    """The corpus at data_path, read once per worker process."""
    with _lock:
        if data_path not in _corpora:
            _corpora.clear()  # one run's corpus at a time: they can be tens of MiB
            _corpora[data_path] = load_corpus(data_path)
        return _corpora[data_path]


def take_warm(key: tuple[str, str]) -> WarmTrainer | None:
    """Hand the warm trainer over if it belongs to this run; the caller owns it until `put_warm`."""
    global _warm
    with _lock:
        warm, _warm = _warm, None
    return warm if warm is not None and warm.key == key else None  # generation kept


def put_warm(warm: WarmTrainer) -> bool:
    """Keep a trainer whose memory equals the committed checkpoint `warm.at_ref`.

    Refused (False) when the cache was dropped since the trainer was made or taken: a failure
    dropped it, and a task still holding it (a retried or abandoned one) must not bring back
    memory that matches no checkpoint.
    """
    global _warm
    with _lock:
        if warm.generation != _generation:
            return False
        _warm = warm
        return True


def drop_warm() -> None:
    """Forget the warm trainer, also any one handed out (after a failure its memory matches
    no checkpoint)."""
    global _warm, _generation
    with _lock:
        _warm = None
        _generation += 1


def put_spare(key: tuple[str, str], trainer: Trainer) -> None:
    """Keep a trainer built ahead of need (a hot spare); its state is overwritten on use."""
    global _spare
    with _lock:
        _spare = (key, trainer)


def take_spare(key: tuple[str, str]) -> Trainer | None:
    """The trainer a hot spare built for this run, once; None when there is none."""
    global _spare
    with _lock:
        spare, _spare = _spare, None
    return spare[1] if spare is not None and spare[0] == key else None
