"""Optimisation hyperparameters: what a preset supplies and a user may override."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any


def _positive_int(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _non_negative_float(name: str, value: Any) -> None:
    if not isinstance(value, int | float) or isinstance(value, bool) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")


@dataclass(frozen=True)
class Hyperparameters:
    """How to train: schedule, batch and optimizer settings. All of it changes the math."""

    steps: int
    """Total optimizer steps of the run; fixes the length of the LR schedule."""
    batch_size: int
    """Sequences per optimizer step."""
    lr: float
    """Peak learning rate, reached at the end of warm-up."""
    min_lr: float
    """Learning rate the cosine decay ends at (step == steps)."""
    warmup_steps: int
    """Steps of linear warm-up from ~0 to lr; at most steps."""
    weight_decay: float
    """AdamW decoupled weight decay, applied to 2-D weights only (not to gains or biases)."""
    grad_clip: float
    """Clip the global gradient norm to this value; 0 turns clipping off."""
    betas: tuple[float, float]
    """AdamW (beta1, beta2)."""
    eval_batches: int
    """Held-out batches averaged by an evaluation."""
    epoch_steps: int | None = None
    """Batches per epoch (a seeded sample of the corpus); None: one full pass over it."""

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_batches"):
            _positive_int(name, getattr(self, name))
        if self.epoch_steps is not None:
            _positive_int("epoch_steps", self.epoch_steps)
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool):
            raise ValueError(f"warmup_steps must be an integer, got {self.warmup_steps!r}")
        if not 0 <= self.warmup_steps <= self.steps:
            raise ValueError(
                f"warmup_steps must be in [0, steps={self.steps}], got {self.warmup_steps}"
            )
        for name in ("lr", "min_lr", "weight_decay", "grad_clip"):
            _non_negative_float(name, getattr(self, name))
            # Frozen, so normalise through object.__setattr__: JSON may hand us 0 for 0.0.
            object.__setattr__(self, name, float(getattr(self, name)))
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be <= lr ({self.lr})")
        betas = tuple(self.betas) if isinstance(self.betas, list | tuple) else ()
        if len(betas) != 2 or not all(
            isinstance(b, int | float) and not isinstance(b, bool) and 0 <= b < 1 for b in betas
        ):
            raise ValueError(f"betas must be two numbers in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", (float(betas[0]), float(betas[1])))


HPARAM_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Hyperparameters))
"""Every hyperparameter a preset must supply, in declaration order."""
