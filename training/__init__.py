"""Rebound: training — pure PyTorch models, data, step loop, deterministic RNG, state capture.

Imports neither Prefect, Dask nor storage (DESIGN.md section 1). The names most callers need
are resolved on first use: the coordinator imports training.config and training.data to plan a
run, and must not pay for torch (training.loop, training.model) to do so.
"""

from __future__ import annotations

import importlib
from typing import Any

_HOMES = {
    "ResolvedTrainConfig": "training.config", "TrainConfig": "training.config",
    "Corpus": "training.data", "DataCursor": "training.data", "DataError": "training.data",
    "load_corpus": "training.data", "StepResult": "training.loop", "Trainer": "training.loop",
    "GPT": "training.model", "ModelConfig": "training.model_config",
    "PRESETS": "training.presets", "get_preset": "training.presets",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'training' has no attribute {name!r}")
    return getattr(importlib.import_module(home), name)
