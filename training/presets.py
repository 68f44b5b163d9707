"""Model size presets. They are data: one JSON file per preset in training/presets/.

Each file holds a description, a "model" section (ModelConfig fields) and a "train" section
(every Hyperparameters field). Adding a preset means adding a file, not a code branch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from training.hparams import HPARAM_NAMES, Hyperparameters
from training.model_config import ModelConfig

PRESET_DIR = Path(__file__).with_name("presets")


@dataclass(frozen=True)
class Preset:
    """One named preset: a model shape and the hyperparameters that suit it."""

    name: str
    """File stem, e.g. "tiny"."""
    description: str
    """One line for --help."""
    model: ModelConfig
    """Model shape; vocab_size is replaced by the corpus's at training time."""
    hparams: Hyperparameters
    """Default steps, batch size, schedule and optimizer settings."""


def load_preset_file(path: Path) -> Preset:
    """Parse and validate one preset file; ValueError naming the file and what is wrong."""
    try:
        raw = json.loads(path.read_text())
        model, train = raw["model"], raw["train"]
        if set(train) != set(HPARAM_NAMES):
            missing = sorted(set(HPARAM_NAMES) - set(train))
            extra = sorted(set(train) - set(HPARAM_NAMES))
            raise ValueError(f"train section: missing {missing}, unknown {extra}")
        return Preset(
            name=path.stem,
            description=str(raw.get("description", "")),
            model=ModelConfig(**model),
            hparams=Hyperparameters(**train),
        )
    except (OSError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"bad preset file {path}: {exc}") from exc


def _load_all() -> dict[str, Preset]:
    return {p.stem: load_preset_file(p) for p in sorted(PRESET_DIR.glob("*.json"))}


ALL_PRESETS: dict[str, Preset] = _load_all()
PRESETS: dict[str, ModelConfig] = {name: p.model for name, p in ALL_PRESETS.items()}


def _lookup(name: str) -> Preset:
    if name not in ALL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid: {', '.join(sorted(ALL_PRESETS))}")
    return ALL_PRESETS[name]


def get_preset(name: str) -> ModelConfig:
    """The model shape of preset `name`; ValueError listing the valid names if unknown."""
    return _lookup(name).model


def get_preset_hparams(name: str) -> Hyperparameters:
    """The default hyperparameters of preset `name`; ValueError listing valid names if unknown."""
    return _lookup(name).hparams


def describe_presets() -> str:
    """One line per preset ("tiny: for tests ..."), for --help texts."""
    return "\n".join(f"{name}: {p.description}" for name, p in sorted(ALL_PRESETS.items()))
