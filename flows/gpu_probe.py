"""Whether this machine has a GPU torch can train on, answered without importing torch where
the answer is plain (~1.8 s of the coordinator's start-up)."""

from __future__ import annotations

import os
import sys

GPU_DRIVER_PATHS = ("/dev/nvidiactl", "/proc/driver/nvidia", "/dev/kfd")
"""On Linux a GPU torch can use shows up here (NVIDIA's driver; ROCm's /dev/kfd) before any
library is loaded."""


def cuda_available() -> bool:
    """Whether this machine has a GPU torch can train on. Without a GPU driver on Linux the
    answer is known without importing torch."""
    if sys.platform.startswith("linux") and not any(os.path.exists(p) for p in GPU_DRIVER_PATHS):
        return False
    import torch

    return bool(torch.cuda.is_available())
