"""Learning-rate schedule: linear warm-up, then cosine decay to min_lr (nanoGPT's get_lr)."""

from __future__ import annotations

import math

from training.hparams import Hyperparameters


def lr_at(step: int, cfg: Hyperparameters) -> float:
    """Learning rate for the optimizer step that takes the model from `step` to `step + 1`.

    A pure function of the step, so a resumed run needs no scheduler state.
    """
    if step >= cfg.steps:
        return cfg.min_lr
    if step < cfg.warmup_steps:
        # (step + 1) so the very first step already moves: lr / (warmup + 1), not 0.
        return cfg.lr * (step + 1) / (cfg.warmup_steps + 1)
    progress = (step - cfg.warmup_steps) / (cfg.steps - cfg.warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0 over the decay phase
    return cfg.min_lr + coeff * (cfg.lr - cfg.min_lr)
