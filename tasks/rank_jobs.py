"""What the coordinator and a rank's task exchange about one rank (tasks.rank_runner trains it):
the job, and the two failures the coordinator acts on. Free of torch, so the coordinator is too."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tasks.jobs import GroupJob


class PeerLost(RuntimeError):
    """A collective failed: a peer died or hung. This rank's state is intact at `step`."""

    def __init__(self, rank: int, step: int, reason: str) -> None:
        super().__init__(f"rank {rank}: peer lost at step {step + 1} ({reason})")
        self.rank = rank
        self.step = step
        self.reason = reason

    def __reduce__(self) -> tuple:
        return (PeerLost, (self.rank, self.step, self.reason))


class RanksDisagree(RuntimeError):
    """The ranks' state hashes differ (silent data corruption): nothing is committed."""

    def __init__(self, step: int, hashes: list[str]) -> None:
        super().__init__(f"ranks disagree at step {step}: state hashes {hashes}")
        self.step = step
        self.hashes = hashes

    def __reduce__(self) -> tuple:
        return (RanksDisagree, (self.step, self.hashes))


@dataclass(frozen=True)
class RankJob:
    """One rank's part of a batch group."""

    group: GroupJob
    rank: int
    world_size: int
    rendezvous: dict[str, Any]
    """`training.distributed.Rendezvous.to_dict()` of the current membership."""
    chaos_rank_events: tuple[tuple[str, int], ...] = ()
    """(kind, step) chaos events aimed at this rank (DESIGN.md section 6, `KIND@STEP/RANK`)."""
    replica: int = 0
    """This rank's replica group (world rank = replica x world_size + rank)."""
    replicas: int = 1
    """Replica groups in the membership; the rendezvous holds replicas x world_size ranks."""
    policy: str = "first"
    """'first': no votes between replicas; 'vote': state hashes compared at every checkpoint,
    group end and every `vote_every` steps."""
    vote_every: int | None = None
    trusted: tuple[int, str] | None = None
    """(step, state_hash) the flow settled after a disagreement: state at that step with another
    hash is never a source."""
    newest_step: int | None = None
    """The newest committed checkpoint step <= the group's end as the flow found it before this
    attempt (-1: none); None: world rank 0 looks it up and tells the others."""
    peers: tuple[int, ...] = ()
    """World ranks the flow expects to hold the state in memory (the replica that finished the
    last group): preferred as the source of a peer restore."""
    recompute_to: int | None = None
    """A third opinion: train from the newest checkpoint to this step, write nothing, return
    the state hash (the group's own steps are ignored)."""

    @property
    def world_rank(self) -> int:
        return self.replica * self.world_size + self.rank

    @property
    def name(self) -> str:
        """'r.k' with replicas, else the rank."""
        return f"{self.replica}.{self.rank}" if self.replicas > 1 else str(self.rank)


__all__ = ["PeerLost", "RankJob", "RanksDisagree"]
