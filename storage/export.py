"""Export a checkpoint to safetensors or a plain torch state dict (both loadable without pickle
code execution: ``safetensors.torch.load_file`` / ``torch.load(weights_only=True)``)."""

from __future__ import annotations

import json
import os
import uuid
from typing import Any, Literal

ExportFormat = Literal["safetensors", "torch"]


def write_export(tensors: dict[str, Any], metadata: dict, out_path: str, fmt: ExportFormat) -> None:
    """Write ``tensors`` to ``out_path`` atomically (temporary file, fsync, rename)."""
    if fmt not in ("safetensors", "torch"):
        raise ValueError(f"format must be 'safetensors' or 'torch', got {fmt!r}")
    out_path = os.path.abspath(out_path)
    os.makedirs(os.path.dirname(out_path), exist_ok=True)
    tmp = f"{out_path}.tmp-{uuid.uuid4().hex}"
    try:
        if fmt == "safetensors":
            from safetensors.torch import save_file

            # safetensors metadata is str -> str: the training metadata travels as JSON.
            save_file(tensors, tmp, metadata={"rebound_metadata": json.dumps(metadata)})
        else:
            import torch

            torch.save(dict(tensors), tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
