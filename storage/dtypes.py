"""The dtypes a checkpoint can hold and how each is stored in Zarr.

Zarr v3 lacks bfloat16 and the float8 types: they are stored as same-width unsigned integer
views (bit-exact) with the true dtype kept in the array attributes and the manifest.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DType:
    """One supported dtype.

    Attributes:
        name: the true dtype, as torch/numpy spell it without prefix ("bfloat16").
        stored: the Zarr v3 ``data_type`` the bytes are stored as.
        itemsize: bytes per element.
        fill_value: the Zarr fill value written into array metadata.
    """

    name: str
    stored: str
    itemsize: int
    fill_value: object


_TABLE = [
    DType("bool", "bool", 1, False),
    DType("uint8", "uint8", 1, 0),
    DType("int8", "int8", 1, 0),
    DType("int16", "int16", 2, 0),
    DType("uint16", "uint16", 2, 0),
    DType("int32", "int32", 4, 0),
    DType("uint32", "uint32", 4, 0),
    DType("int64", "int64", 8, 0),
    DType("uint64", "uint64", 8, 0),
    DType("float16", "float16", 2, 0.0),
    DType("float32", "float32", 4, 0.0),
    DType("float64", "float64", 8, 0.0),
    DType("bfloat16", "uint16", 2, 0),
    DType("float8_e4m3fn", "uint8", 1, 0),
    DType("float8_e5m2", "uint8", 1, 0),
]
DTYPES: dict[str, DType] = {d.name: d for d in _TABLE}


def lookup(name: str) -> DType:
    """The DType called ``name``; ValueError for anything we do not store."""
    try:
        return DTYPES[name]
    except KeyError:
        raise ValueError(
            f"unsupported dtype {name!r}; supported: {', '.join(sorted(DTYPES))}"
        ) from None
