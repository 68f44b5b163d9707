"""Rebound: training — pure PyTorch models, data, step loop, deterministic RNG, state capture.

Imports neither Prefect, Dask nor storage (DESIGN.md section 1). The names most callers need:
"""

from training.config import ResolvedTrainConfig, TrainConfig
from training.data import Corpus, DataCursor, DataError, load_corpus
from training.loop import StepResult, Trainer
from training.model import GPT, ModelConfig
from training.presets import PRESETS, get_preset

__all__ = [
    "GPT",
    "PRESETS",
    "Corpus",
    "DataCursor",
    "DataError",
    "ModelConfig",
    "ResolvedTrainConfig",
    "StepResult",
    "TrainConfig",
    "Trainer",
    "get_preset",
    "load_corpus",
]
