"""Small tensors packed end to end into one array per dtype (DESIGN.md §2 allows it).

A GPT's state holds hundreds of tensors of a few KiB (norms, biases, AdamW step counters). As an
array each, every one costs a folder, a chunk folder, a chunk file and a ``zarr.json``: about
3 ms apiece on the disks we measured, which made 40% of a 512 MiB save's time for 0.2% of its
bytes (274 of 412 arrays, 0.87 MiB; see the issue note). Tensors under ``pack_bytes`` (64 KiB
by default: a 64 KiB write costs tens of microseconds, a file a millisecond or more, and
bigger tensors stay arrays of their own for readers, incremental saves and shard balance) are
instead laid end to end, in name order, in one 1-d array per dtype, ``_packed/<dtype>``; its
``zarr.json`` lists every member's name, offset (in elements) and shape under the attribute
``packed``, and the manifest lists them too. Readers of the store (``load``, ``verify``,
``export``, ``inspect``) see the tensors, never the pack.

Reading one tensor with plain zarr-python: the README's recipe, which the tests run
(``tests/storage_helpers.py::zarr_tensor``).

The plan depends only on names, dtypes, shapes and the two sizes, so every data-parallel rank
computes the same one without talking to the others.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from storage.dtypes import lookup
from storage.layout import ArrayLayout, plan_array

PACK_GROUP = "_packed"
DEFAULT_PACK_BYTES = 64 << 10

ArraySpec = tuple[str, str, tuple[int, ...]]  # name, dtype, shape


@dataclass(frozen=True)
class Member:
    """One tensor inside a pack.

    Attributes:
        name: the tensor's name.
        shape: its shape.
        offset: where its first element is in the pack, in elements.
    """

    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class CheckpointPlan:
    """Every array a checkpoint of some tensors has, and which tensors went into packs.

    Attributes:
        layouts: every array (tensors stored alone, and packs), sorted by name.
        members: pack array name -> its tensors in name order.
    """

    layouts: tuple[ArrayLayout, ...]
    members: Mapping[str, tuple[Member, ...]]

    def packed(self) -> dict[str, tuple[str, Member]]:
        """Tensor name -> (pack name, member) for every packed tensor."""
        return {m.name: (pack, m) for pack, ms in self.members.items() for m in ms}


def array_specs(tensors: Mapping[str, Any]) -> list[ArraySpec]:
    """(name, dtype, shape) of every tensor, sorted by name, without touching tensor data."""
    from storage.tensors import dtype_name

    out = []
    for name in sorted(tensors):
        x = tensors[name]
        shape = x.shape if hasattr(x, "shape") else np.shape(x)
        out.append((name, dtype_name(x), tuple(int(d) for d in shape)))
    return out


def pack_name(dtype: str) -> str:
    """The array a dtype's small tensors are packed into."""
    return f"{PACK_GROUP}/{dtype}"


def is_pack_name(name: str) -> bool:
    return name.split("/", 1)[0] == PACK_GROUP


def check_pack_bytes(pack_bytes: int) -> int:
    if not isinstance(pack_bytes, int) or isinstance(pack_bytes, bool) or pack_bytes < 0:
        raise ValueError(f"pack_bytes must be an int >= 0 (0: never pack), got {pack_bytes!r}")
    return pack_bytes


def plan_checkpoint(specs: Sequence[ArraySpec], chunk_bytes: int, pack_bytes: int) -> CheckpointPlan:
    """Which tensors are stored alone and which are packed, and every array's layout.

    A dtype's tensors under ``pack_bytes`` are packed when there are at least two of them (a
    pack of one would only rename the tensor).
    """
    small: dict[str, list[ArraySpec]] = {}
    for name, dtype, shape in specs:
        if math.prod(shape) * lookup(dtype).itemsize < pack_bytes:
            small.setdefault(dtype, []).append((name, dtype, shape))
    members: dict[str, tuple[Member, ...]] = {}
    for dtype, group in sorted(small.items()):
        if len(group) < 2:
            continue
        offset, ms = 0, []
        for name, _, shape in sorted(group):
            ms.append(Member(name, tuple(shape), offset))
            offset += math.prod(shape)
        members[pack_name(dtype)] = tuple(ms)
    packed = {m.name for ms in members.values() for m in ms}
    layouts = [plan_array(n, lookup(d), tuple(s), chunk_bytes) for n, d, s in specs if n not in packed]
    for pack, ms in members.items():
        dtype = pack.split("/", 1)[1]
        layouts.append(plan_array(pack, lookup(dtype), (ms[-1].offset + ms[-1].numel,), chunk_bytes))
    return CheckpointPlan(tuple(sorted(layouts, key=lambda lay: lay.name)), members)


def tensor_specs(layouts: Sequence[ArrayLayout], members: Mapping[str, Sequence[Member]]) -> list[ArraySpec]:
    """(name, dtype, shape) of every tensor a checkpoint holds, sorted by name."""
    out: list[ArraySpec] = []
    for lay in layouts:
        ms = members.get(lay.name)
        if ms:
            out += [(m.name, lay.dtype.name, m.shape) for m in ms]
        else:
            out.append((lay.name, lay.dtype.name, lay.shape))
    return sorted(out)


def pack_buffer(layout: ArrayLayout) -> np.ndarray:
    """Zeroed host bytes for a whole pack (members are copied in as they are read)."""
    return np.zeros(layout.data_nbytes, dtype=np.uint8)


def put_member(buffer: np.ndarray, member: Member, itemsize: int, data: memoryview) -> None:
    """Copy one tensor's flat bytes into its place in a pack's buffer."""
    start = member.offset * itemsize
    buffer[start : start + len(data)] = np.frombuffer(data, dtype=np.uint8)


def build_pack(layout: ArrayLayout, members: Sequence[Member], tensors: Mapping[str, Any]) -> np.ndarray:
    """A pack's bytes from the tensors it holds."""
    from storage.tensors import host_bytes

    buffer = pack_buffer(layout)
    for m in members:
        put_member(buffer, m, layout.dtype.itemsize, host_bytes(tensors[m.name]).data)
    return buffer


def validate_members(pack: ArrayLayout, raw: object) -> tuple[Member, ...]:
    """A pack's member list read from a manifest; ValueError unless it tiles the pack exactly."""
    from storage.names import validate_tensor_name

    if not is_pack_name(pack.name) or pack.name != pack_name(pack.dtype.name):
        raise ValueError(f"array {pack.name!r} lists packed tensors but is not a {PACK_GROUP} array")
    if len(pack.shape) != 1 or not isinstance(raw, list) or not raw:
        raise ValueError("a pack is a 1-d array with a non-empty member list")
    out, offset = [], 0
    for m in raw:
        if not isinstance(m, dict) or set(m) != {"name", "shape", "offset"}:
            raise ValueError(f"bad pack member {m!r}")
        shape = m["shape"]
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40 for d in shape
        ):
            raise ValueError(f"bad shape in pack member {m!r}")
        if m["offset"] != offset:
            raise ValueError(f"pack member {m.get('name')!r} is at offset {m['offset']!r}, expected {offset}")
        out.append(Member(validate_tensor_name(m["name"]), tuple(shape), offset))
        offset += math.prod(shape)
    if offset != pack.shape[0]:
        raise ValueError(f"pack members hold {offset} elements, the array {pack.shape[0]}")
    return tuple(out)


def encode_members(members: Sequence[Member]) -> list[dict]:
    """The JSON list a pack's zarr.json and manifest entry carry."""
    return [{"name": m.name, "shape": list(m.shape), "offset": m.offset} for m in members]
