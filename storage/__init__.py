"""Rebound storage: a verified Zarr v3 checkpoint store (DESIGN.md §2).

Imports neither Prefect nor Dask, and torch only when tensors are saved or loaded.
"""

from storage.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FatalStoreError,
    StoreError,
    TransientStoreError,
    classify_os_error,
)
from storage.hashing import state_hash
from storage.reader import VerifyReport
from storage.refs import CheckpointRef
from storage.shards import ShareError, ShareReceipt, plan_shards
from storage.store import CheckpointStore, LoadedCheckpoint, StoreConfig, open_store
from storage.writer import SaveStats

__all__ = [
    "CheckpointNotFoundError",
    "CheckpointRef",
    "CheckpointStore",
    "CorruptCheckpointError",
    "FatalStoreError",
    "LoadedCheckpoint",
    "SaveStats",
    "ShareError",
    "ShareReceipt",
    "StoreConfig",
    "StoreError",
    "TransientStoreError",
    "VerifyReport",
    "classify_os_error",
    "open_store",
    "plan_shards",
    "state_hash",
]
