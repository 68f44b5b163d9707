"""A worker's membership in its data-parallel group, kept from one batch group to the next.

Joining costs a rendezvous and gloo's connection set-up; while the membership is unchanged
(the flow hands out the same namespace) the next group reuses the process group as it is.
"""

from __future__ import annotations

import threading

from training.distributed import RankGroup, Rendezvous

_lock = threading.Lock()
_current: tuple[Rendezvous, int, RankGroup] | None = None


def rank_group_for(rdv: Rendezvous, rank: int, device: str = "cpu",
                   row_size: int | None = None) -> RankGroup:
    """This worker's RankGroup for (rdv, world rank): the cached one, or a freshly joined one.

    device: where the trainer's tensors live; cuda means NCCL (the worker's one GPU), cpu gloo.
    row_size: ranks per replica (default: the whole rendezvous is one replica).
    """
    global _current
    with _lock:
        if _current is not None:
            cached_rdv, cached_rank, group = _current
            if cached_rdv == rdv and cached_rank == rank and group.alive and \
                    str(group.device) == str(device) and \
                    group.world_size == (row_size or rdv.world_size):
                return group
            group.close()
            _current = None
        group = RankGroup(rdv, rank, device, row_size)
        _current = (rdv, rank, group)
        return group


def leave_group() -> None:
    """Forget the membership (after a failed collective the group is rebuilt, not patched)."""
    global _current
    with _lock:
        if _current is not None:
            _current[2].close()
            _current = None
