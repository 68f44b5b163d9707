"""Rebound storage: a verified Zarr v3 checkpoint store (DESIGN.md §2).

Imports neither Prefect nor Dask, and torch only when tensors are saved or loaded.
"""

from storage.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StoreError,
    TransientStoreError,
)
from storage.hashing import state_hash
from storage.reader import VerifyReport
from storage.refs import CheckpointRef
from storage.store import CheckpointStore, LoadedCheckpoint, StoreConfig, open_store
from storage.writer import SaveStats

__all__ = [
    "CheckpointNotFoundError",
    "CheckpointRef",
    "CheckpointStore",
    "CorruptCheckpointError",
    "LoadedCheckpoint",
    "SaveStats",
    "StoreConfig",
    "StoreError",
    "TransientStoreError",
    "VerifyReport",
    "open_store",
    "state_hash",
]
