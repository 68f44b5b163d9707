"""Training configuration: what the user asks for (TrainConfig) and what it resolves to.

TrainConfig leaves most fields None, meaning "the preset's value". `resolved()` fills them in and
returns a ResolvedTrainConfig, the one object the trainer reads. Its `config_hash` identifies the
math of a run, so a resumed run can check it is continuing the same thing.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from training.hparams import HPARAM_NAMES, Hyperparameters
from training.model_config import ModelConfig
from training.presets import get_preset, get_preset_hparams

_DEVICES = ("auto", "cpu", "cuda")


def _check_device(device: str) -> None:
    if not isinstance(device, str) or device.split(":")[0] not in _DEVICES:
        raise ValueError(f"device must be one of {', '.join(_DEVICES)} (or cuda:N), got {device!r}")


def _check_threads(torch_threads: int | None) -> None:
    if torch_threads is not None and (
        not isinstance(torch_threads, int) or isinstance(torch_threads, bool) or torch_threads < 1
    ):
        raise ValueError(f"torch_threads must be a positive integer or None, got {torch_threads!r}")


@dataclass(frozen=True, kw_only=True)
class ResolvedTrainConfig(Hyperparameters):
    """Every setting of a run, nothing left to a default: the hyperparameters plus these."""

    preset: str
    """Name of the preset this was resolved from (informational; not in the hash)."""
    model: ModelConfig
    """Model shape, block_size override applied. vocab_size is the preset's; the trainer uses
    the corpus's (which the corpus fingerprint pins down)."""
    seed: int
    """Seeds initialisation, data order and per-step randomness."""
    device: str = "auto"
    """auto | cpu | cuda[:N]; where to run. Not part of the hash."""
    torch_threads: int | None = None
    """torch.set_num_threads for this process; None leaves torch's choice. Not part of the hash."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"seed must be an integer >= 0, got {self.seed!r}")
        _check_device(self.device)
        _check_threads(self.torch_threads)

    @property
    def block_size(self) -> int:
        """Tokens per training sequence (the model's context length)."""
        return self.model.block_size

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; `from_dict` is its inverse."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["model"] = asdict(self.model)
        out["betas"] = list(self.betas)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ResolvedTrainConfig:
        """Rebuild from `to_dict()` output (e.g. a run's stored config)."""
        return cls(**{**data, "model": ModelConfig(**data["model"])})

    def config_hash(self, corpus_fingerprint: str) -> str:
        """sha256 hex over everything that changes the math: model, hyperparameters, seed, data.

        Device and thread count are left out: they say where the run goes, not what it computes.
        """
        math = {name: getattr(self, name) for name in HPARAM_NAMES}
        math.update(betas=list(self.betas), model=asdict(self.model), seed=self.seed)
        math["data"] = corpus_fingerprint
        blob = json.dumps(math, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class TrainConfig:
    """What the user asks for. None means "the preset's default"."""

    model: str = "small"
    """Model size preset (see training/presets/*.json)."""
    steps: int | None = None
    """Total optimizer steps; fixes the LR schedule."""
    seed: int = 1337
    """Seeds initialisation, data order and per-step randomness."""
    batch_size: int | None = None
    """Sequences per optimizer step."""
    block_size: int | None = None
    """Tokens per sequence (the model's context length)."""
    lr: float | None = None
    """Peak learning rate."""
    min_lr: float | None = None
    """Learning rate at the end of the cosine decay; None: the preset's ratio to lr."""
    warmup_steps: int | None = None
    """Linear warm-up steps; None: the preset's, but at most a tenth of steps when steps is set."""
    weight_decay: float | None = None
    """AdamW weight decay on 2-D weights."""
    grad_clip: float | None = None
    """Max global gradient norm; 0 disables clipping."""
    betas: tuple[float, float] | None = None
    """AdamW (beta1, beta2)."""
    eval_batches: int | None = None
    """Held-out batches per evaluation."""
    epoch_steps: int | None = None
    """Batches per epoch (evaluation and retention points); None: the preset's."""
    device: str = "auto"
    """auto | cpu | cuda[:N]."""
    torch_threads: int | None = None
    """torch threads for this process; None leaves torch's default."""

    def __post_init__(self) -> None:
        # Resolving validates every field against the preset, so a bad value fails here, at the
        # point the user made it, with the field's name.
        self.resolved()

    def resolved(self) -> ResolvedTrainConfig:
        """Fill every None from the preset and validate the result."""
        model = get_preset(self.model)
        if self.block_size is not None:
            model = replace(model, block_size=self.block_size)
        defaults = get_preset_hparams(self.model)
        overrides = {
            name: getattr(self, name) for name in HPARAM_NAMES if getattr(self, name) is not None
        }
        if self.warmup_steps is None and self.steps is not None:
            # A shortened run keeps a proportionate warm-up instead of failing validation.
            overrides["warmup_steps"] = min(defaults.warmup_steps, self.steps // 10)
        if self.min_lr is None and self.lr is not None:
            # Keep the preset's decay ratio (nanoGPT: min_lr = lr / 10) when only lr is given.
            overrides["min_lr"] = defaults.min_lr * self.lr / defaults.lr
        hparams = replace(defaults, **overrides)
        return ResolvedTrainConfig(
            **{name: getattr(hparams, name) for name in HPARAM_NAMES},
            preset=self.model,
            model=model,
            seed=self.seed,
            device=self.device,
            torch_threads=self.torch_threads,
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields as given (None where the preset decides), JSON-ready."""
        out = asdict(self)
        if self.betas is not None:
            out["betas"] = list(self.betas)
        return out

    def config_hash(self, corpus_fingerprint: str) -> str:
        """Same as `resolved().config_hash(...)`."""
        return self.resolved().config_hash(corpus_fingerprint)
