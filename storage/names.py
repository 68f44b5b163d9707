"""Validation of every name that becomes part of a path, and the step folder naming.

Array names come from callers on save and from manifests on load; a manifest is data from
disk, so a name in it must never let a reader escape the checkpoint's folder.
"""

from __future__ import annotations

import re

STEP_DIGITS = 12
_STEP_RE = re.compile(rf"^\d{{{STEP_DIGITS}}}$")
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")
_DOC_SEGMENT_RE = re.compile(r"^[A-Za-z0-9_.\-@+=,]+$")
# Names our own files take inside a checkpoint folder: an array may not shadow them.
_RESERVED_TOP = {"manifest.json", "COMMITTED", "zarr.json"}
_RESERVED_ANY = {"zarr.json", ".", ".."}


def step_dirname(step: int) -> str:
    """``123`` -> ``000000000123``: fixed width so lexical order is step order."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0 or step >= 10**STEP_DIGITS:
        raise ValueError(f"step must be an int in [0, 10**{STEP_DIGITS}), got {step!r}")
    return f"{step:0{STEP_DIGITS}d}"


def parse_step_dirname(name: str) -> int | None:
    """The step a folder name stands for, or None when it is not a step folder."""
    return int(name) if _STEP_RE.match(name) else None


def _check_segments(name: str, what: str, segment_re: re.Pattern[str]) -> None:
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty string, got {name!r}")
    if name.startswith("/") or "\\" in name:
        raise ValueError(f"{what} {name!r}: absolute paths and backslashes are not allowed")
    for seg in name.split("/"):
        if not seg:
            raise ValueError(f"{what} {name!r}: empty path segment")
        if seg in _RESERVED_ANY:
            raise ValueError(f"{what} {name!r}: segment {seg!r} is reserved")
        if not segment_re.match(seg):
            raise ValueError(
                f"{what} {name!r}: only letters, digits and _ . - / are allowed"
            )


def validate_array_name(name: str) -> str:
    """Raise ValueError unless ``name`` is a safe relative array path; returns it."""
    _check_segments(name, "array name", _SEGMENT_RE)
    if name.split("/")[0] in _RESERVED_TOP:
        raise ValueError(f"array name {name!r} collides with a checkpoint file")
    return name


def validate_tensor_name(name: str) -> str:
    """A tensor's name as a caller gives it: a safe array name outside the packs' group."""
    validate_array_name(name)
    from storage.packing import PACK_GROUP

    if name.split("/")[0] == PACK_GROUP:
        raise ValueError(f"tensor name {name!r}: {PACK_GROUP!r} is reserved for packed small tensors")
    return name


def validate_run_id(run_id: str) -> str:
    """A run id is one path segment that is not hidden (dot-folders are ours)."""
    if not isinstance(run_id, str) or "/" in run_id:
        raise ValueError(f"run id must be one path segment, got {run_id!r}")
    _check_segments(run_id, "run id", _SEGMENT_RE)
    if run_id.startswith("."):
        raise ValueError(f"run id {run_id!r} may not start with '.'")
    return run_id


def validate_doc_name(name: str) -> str:
    """Names of run-level JSON documents; '/' makes sub-folders (e.g. ``chaos/raise@300``)."""
    _check_segments(name, "document name", _DOC_SEGMENT_RE)
    if any(seg.startswith(".") for seg in name.split("/")):
        raise ValueError(f"document name {name!r}: segments may not start with '.'")
    return name


def check_tree(names: list[str]) -> None:
    """Reject a name set where one array's path is a group of another ('a' and 'a/b')."""
    arrays = set(names)
    for name in names:
        parts = name.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in arrays:
                raise ValueError(
                    f"array names {prefix!r} and {name!r} conflict: {prefix!r} would be "
                    "both an array and a group"
                )
