"""The small values that travel through Prefect and Dask: jobs in, checkpoint references out."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class RunSpec:
    """Everything a worker needs to rebuild a run's trainer; identical for every task of a run."""

    run_id: str
    """Run name: `<store>/<run_id>/`."""
    store_url: str
    """Checkpoint store URL (local path or fsspec URL) every worker can reach."""
    train_config: dict[str, Any]
    """`training.config.TrainConfig` fields."""
    data_path: str | None
    """Corpus path; None = the Python standard library's source."""
    config_hash: str
    """Hash of everything that changes the math; checked against each checkpoint loaded."""
    chaos_spec: str = ""
    """DESIGN.md section 6 chaos spec."""
    device: str = "auto"
    """auto | cpu | cuda."""
    keep_last: int = 3
    """Retention: the newest checkpoints kept (plus protected epoch ends)."""
    async_save: bool = False
    """Checkpoints inside a group are written in the background (tasks/background_saves.py)."""
    incremental_saves: bool = False
    """Chunks unchanged since the previous checkpoint are linked, not written
    (StoreConfig.incremental)."""
    lease_epoch: int | None = None
    """The coordinator's lease epoch (`storage.lease`): every commit carries it and is refused
    once another coordinator took the run over or the lease expired; None = unfenced."""

    def store_options(self) -> dict[str, Any]:
        """StoreConfig options for the workers' saves. With incremental saves, one file is
        shared by fewer checkpoints than are kept, so bit rot in one file always leaves a
        retained checkpoint without it to fall back to."""
        return {"incremental": self.incremental_saves, "max_sharing": max(2, self.keep_last - 1)}


@dataclass(frozen=True)
class GroupJob:
    """Train the steps (first_step, last_step] of one batch group."""

    run: RunSpec
    first_step: int
    """Step the group starts from (the previous group's last step)."""
    last_step: int
    """Step at which the group ends (with a checkpoint unless save_end is False)."""
    ckpt_every: int
    """Checkpoint at every multiple of this step inside the group (plus the group's end, see
    save_end)."""
    protect_steps: tuple[int, ...] = ()
    """Checkpoints retention must keep (epoch ends)."""
    deadline_unix: float | None = None
    """Wall-clock time after which the group stops at its next checkpoint (--time-budget)."""
    commit_end: bool = True
    """With --async-save, False lets the group return while its end checkpoint is still being
    written (the flow needs it only at an epoch's end and at the run's last group)."""
    save_end: bool = True
    """False: the group's end is no checkpoint of its own unless it falls on the interval (one
    worker, background saves, an interval set): the next group on this worker goes on from
    memory, and a failure resumes from the newest interval checkpoint as it would mid-group."""


@dataclass
class GroupResult:
    """What a batch group hands back: a reference to its last checkpoint and its metrics."""

    ref: dict[str, Any]
    """`storage.CheckpointRef.to_dict()` of the last committed checkpoint."""
    step: int
    """Step of that checkpoint."""
    stopped_early: bool = False
    """True when a deadline stopped the group before last_step."""
    reused: bool = False
    """True when the group's checkpoint was already committed and no step was trained."""
    resumed_from_step: int | None = None
    """Checkpoint step the group's training started from."""
    warm: bool = False
    """True when the worker's in-memory state was used instead of loading the checkpoint."""
    steps_trained: int = 0
    train_loss: float | None = None
    """Mean loss over the group's last few steps."""
    losses: list[tuple[int, float]] = field(default_factory=list)
    tokens: int = 0
    train_s: float = 0.0
    """Seconds spent in optimizer steps."""
    ckpt_s: float = 0.0
    """Seconds spent saving checkpoints (the training stall)."""
    load_s: float = 0.0
    background_stall_s: float = 0.0
    """Of ckpt_s, what the background saves' snapshots (and waits for the save before) took."""
    background_saves: int = 0
    """Saves started in the background (--async-save)."""
    background_drag_s: float = 0.0
    """How much longer the steps trained while a background save was in flight took than this
    worker's steps without one (tasks/background_saves.py, StepDrag): a save's cost that no
    stall shows, large where the save's hashing and writing share the cores training uses."""
    background_overlap_steps: int = 0
    """How many steps background_drag_s was measured over (0: not measured yet)."""
    checkpoints: list[int] = field(default_factory=list)
    """Steps committed by this group."""
    worker: str | None = None
    corrupt: list[str] = field(default_factory=list)
    """One line per corrupt checkpoint skipped on load."""
    save_retries: list[str] = field(default_factory=list)
    """One line per checkpoint save retried after a transient I/O error."""
    bytes_reused: int = 0
    """Chunk bytes a save took over from an interrupted earlier save of the same step."""
    attempt: str | None = None
    """Name of this attempt's record in the store (`attempts/...`); None when reused."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
