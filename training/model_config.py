"""The shape of a GPT (training.model builds it): a plain dataclass, so the coordinator plans a
run and hashes its config without importing torch."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """Shape of a GPT. Everything here changes the math, so all of it goes into the config hash."""

    n_layer: int = 4
    """Number of transformer blocks."""
    n_head: int = 4
    """Attention heads per block; must divide n_embd."""
    n_embd: int = 256
    """Width of the residual stream."""
    block_size: int = 128
    """Context length in tokens (size of the position embedding)."""
    vocab_size: int = 256
    """Token vocabulary: 256 for bytes, max token + 1 for a uint16 .bin corpus."""
    dropout: float = 0.0
    """Dropout probability in attention, MLP and embeddings (0 = off)."""
    bias: bool = False
    """Biases in Linear layers and LayerNorms (nanoGPT: False is a bit better and faster)."""

    def __post_init__(self) -> None:
        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")


__all__ = ["ModelConfig"]
