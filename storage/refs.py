"""CheckpointRef: the small value that travels through Prefect and Dask instead of tensors."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CheckpointRef:
    """Names one committed checkpoint.

    Attributes:
        run_id: the run.
        step: the optimizer step the checkpoint captures.
        manifest_hash: xxh3-128 hex of the manifest bytes, as recorded in the commit marker;
            pins the exact content (a re-saved step with other bytes has another hash).
    """

    run_id: str
    step: int
    manifest_hash: str

    def to_dict(self) -> dict:
        """JSON-able form."""
        return {"run_id": self.run_id, "step": self.step, "manifest_hash": self.manifest_hash}

    @classmethod
    def from_dict(cls, d: dict) -> CheckpointRef:
        """Inverse of ``to_dict``."""
        return cls(run_id=str(d["run_id"]), step=int(d["step"]), manifest_hash=str(d["manifest_hash"]))

    def __str__(self) -> str:
        return f"{self.run_id}@{self.step} ({self.manifest_hash[:12]})"
