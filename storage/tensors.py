"""Thin adapter between torch/numpy tensors and flat byte views (the only module needing torch).

Saving reads a tensor's memory in place (zero copy for contiguous CPU tensors); loading
allocates the final tensor once and reads chunk files straight into its memory.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from storage.dtypes import lookup

if sys.byteorder != "little":  # the format is little endian and we write memory as-is
    raise ImportError("storage needs a little-endian host")


@dataclass
class HostBytes:
    """A tensor seen as flat little-endian bytes on the host.

    Attributes:
        dtype: true dtype name ("bfloat16").
        shape: the tensor's shape.
        data: a flat uint8 memoryview over the tensor's bytes.
        owner: keeps the memory alive while ``data`` is used.
        copied: True when ``data`` is a temporary copy (device transfer, contiguous copy).
    """

    dtype: str
    shape: tuple[int, ...]
    data: memoryview
    owner: Any
    copied: bool = False


def _is_torch(x: object) -> bool:
    return type(x).__module__.startswith("torch")


def dtype_name(x: Any) -> str:
    """The true dtype name of a tensor or array, without touching its data."""
    if _is_torch(x):
        return str(x.dtype).removeprefix("torch.")
    return np.asarray(x).dtype.name


def host_bytes(x: Any) -> HostBytes:
    """View a torch tensor or numpy array as bytes; copies only when it must.

    A copy happens for non-CPU tensors, non-contiguous tensors and big-endian numpy arrays,
    one tensor at a time, so peak extra memory is one tensor at most.
    """
    if _is_torch(x):
        import torch

        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a tensor, got {type(x).__name__}")
        if x.layout != torch.strided:
            raise TypeError(f"only dense tensors can be saved, got layout {x.layout}")
        t = x.detach()
        orig_ptr = t.data_ptr() if t.device.type == "cpu" else None
        if t.device.type != "cpu":
            t = t.to("cpu")
        if t.is_conj():
            t = t.resolve_conj()
        if t.is_neg():
            t = t.resolve_neg()
        if not t.is_contiguous():
            t = t.contiguous()
        dtype = str(t.dtype).removeprefix("torch.")
        lookup(dtype)
        # Contiguous means dense, but torch also calls size-0/size-1 tensors with odd strides
        # contiguous; as_strided gives the plain 1-d view of the same memory in every case.
        flat = t.as_strided((t.numel(),), (1,), t.storage_offset()).view(torch.uint8).numpy()
        return HostBytes(dtype, tuple(t.shape), memoryview(flat), t, t.data_ptr() != orig_ptr)
    a = np.asarray(x)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    dtype = a.dtype.name
    lookup(dtype)
    shape = tuple(a.shape)
    # ascontiguousarray turns 0-d into 1-d; we only need the flat bytes, so that is harmless.
    c = np.ascontiguousarray(a)
    flat = c.reshape(-1).view(np.uint8)
    return HostBytes(dtype, shape, memoryview(flat), c, not np.may_share_memory(c, np.asarray(x)))


def empty_tensor(dtype: str, shape: tuple[int, ...], *, pin: bool = False) -> tuple[Any, memoryview]:
    """Allocate a torch tensor to load into; returns it and a writable flat byte view of it."""
    import torch

    lookup(dtype)
    t = torch.empty(shape, dtype=getattr(torch, dtype), pin_memory=pin)
    return t, memoryview(t.reshape(-1).view(torch.uint8).numpy())
