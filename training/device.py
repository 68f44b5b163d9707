"""Where to run: device choice, deterministic settings, and mixed precision on CUDA."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

# cuBLAS reads this when it creates its first handle, so it must be set before any CUDA matmul;
# importing this module (which training.loop does) is early enough. Without it, deterministic
# algorithms cannot make cuBLAS reductions reproducible.
# https://docs.nvidia.com/cuda/cublas/index.html#results-reproducibility
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def resolve_device(name: str = "auto") -> torch.device:
    """auto -> cuda if available else cpu; cpu; cuda or cuda:N (ValueError when CUDA is absent)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.split(":")[0] == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available here; use cpu")
        return torch.device(name)
    raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")


def configure_determinism(device: torch.device) -> None:
    """Make kernels on `device` reproducible run to run (a no-op on CPU, already deterministic)."""
    if device.type != "cuda":
        return
    # warn_only: an op with no deterministic kernel warns instead of killing the run.
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False  # autotuning may pick a different kernel each run
    torch.backends.cudnn.deterministic = True
    # The fused attention kernels' backward passes may accumulate with atomics (PyTorch only
    # warns under warn_only), which would break bit-exact resume; the math kernel is plain
    # matmuls and softmax. Costs speed, which the small presets do not need.
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)


@contextlib.contextmanager
def autocast(device: torch.device) -> Iterator[None]:
    """bf16 autocast on CUDA (weights and optimizer state stay fp32); nothing on CPU."""
    if device.type == "cuda":
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            yield
    else:
        yield
