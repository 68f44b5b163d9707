"""Seeds derived from the run seed, so every random choice is a pure function of (seed, where).

Each use gets its own stream id: the data order of epoch 3 and the dropout masks of step 3 come
from unrelated seeds even though both are "(seed, 3)". numpy's SeedSequence does the mixing, so
nearby inputs give unrelated outputs.
"""

from __future__ import annotations

import numpy as np

INIT_STREAM = 0
"""Weight initialisation: derive_seed(seed, INIT_STREAM, 0)."""
DATA_STREAM = 1
"""Data order: derive_seed(seed, DATA_STREAM, epoch)."""
STEP_STREAM = 2
"""Per-step randomness (dropout): derive_seed(seed, STEP_STREAM, step)."""


def derive_seed(seed: int, stream: int, index: int) -> int:
    """A 63-bit seed for (seed, stream, index), valid for torch.manual_seed and numpy."""
    state = np.random.SeedSequence([seed, stream, index]).generate_state(1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))  # 63 bits: torch.manual_seed takes a signed int64 too


def derive_rank_seed(seed: int, stream: int, index: int, rank: int) -> int:
    """Like derive_seed, for one data-parallel rank: ranks draw unrelated streams, and a world of
    one keeps using derive_seed, so single-worker runs are unchanged."""
    state = np.random.SeedSequence([seed, stream, index, rank, 1]).generate_state(
        1, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))
