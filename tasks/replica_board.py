"""What replica groups tell each other during a batch group, through the coordinator's board.

Each replica trains in its own process group; the few bytes they share - state hashes at a
vote, the reference of a committed checkpoint, which replica writes - go through the small
key-value board of the membership's rendezvous, served by the flow (`RendezvousServer.post`).
The flow marks a replica `dropped/<q>` when it loses one of its ranks, so nobody waits for it.

Keys: `vote/<step>/<replica>.<rank>` = state hash; `committed/<step>` = checkpoint ref (JSON);
`dropped/<replica>` = why.
"""

from __future__ import annotations

import json
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from training.rendezvous import CollectiveError

if TYPE_CHECKING:
    from training.distributed import RankGroup

POLL_S = 0.0005
"""Between two looks at the board (a look costs ~0.15 ms). The store's own blocking wait is
not used: after one of its timeouts the client connection is left unusable."""


class ReplicasDisagree(RuntimeError):
    """Replica groups' state hashes differ at a vote: silent data corruption somewhere."""

    def __init__(self, step: int, hashes: dict[str, str]) -> None:
        super().__init__(f"replicas disagree at step {step}: state hashes "
                         f"{json.dumps(hashes, sort_keys=True)}")
        self.step = step
        self.hashes = hashes

    def __reduce__(self) -> tuple:
        return (ReplicasDisagree, (self.step, self.hashes))


def _has(group: RankGroup, key: str) -> bool:
    return bool(group.board.check([key]))


def dropped(group: RankGroup, replica: int) -> bool:
    """Whether the flow gave up on `replica` for this attempt."""
    return _has(group, f"dropped/{replica}")


def writer(group: RankGroup) -> int | None:
    """The replica that writes checkpoints now: the lowest one not dropped."""
    return next((r for r in range(group.replicas) if not dropped(group, r)), None)


def _wait_for(group: RankGroup, keys: list[str], replica: int, timeout: timedelta) -> bool:
    """True once every key is on the board; False as soon as `replica` is dropped."""
    deadline = time.monotonic() + timeout.total_seconds()
    try:
        while True:
            if group.board.check(keys):
                return True
            if dropped(group, replica):
                return False
            if time.monotonic() > deadline:
                raise CollectiveError(f"replica {replica} did not post {keys[0]} within "
                                      f"{timeout.total_seconds():.0f} s")
            time.sleep(POLL_S)
    except (RuntimeError, OSError) as err:
        if isinstance(err, CollectiveError):
            raise
        raise CollectiveError(f"the coordinator's board is unreachable: {err}") from None


def _ballot(group: RankGroup, step: int, wait: bool) -> dict[str, str] | None:
    """Every live replica's hashes at `step`; None (without `wait`) while some are missing."""
    global _waited_s
    votes: dict[str, str] = {}
    for replica in range(group.replicas):
        keys = [f"vote/{step}/{replica}.{rank}" for rank in range(group.world_size)]
        if replica != group.replica and not group.board.check(keys):
            if not wait and not dropped(group, replica):
                return None
            t0 = time.perf_counter()
            arrived = wait and _wait_for(group, keys, replica, group.rdv.timeout)
            _waited_s += time.perf_counter() - t0
            if arrived:
                pass
            else:
                keys = [k for k in keys if _has(group, k)]
        for key in keys:
            votes[key.rsplit("/", 1)[1]] = group.board.get(key).decode()
    return votes


_waited_s = 0.0


def vote(group: RankGroup, step: int, state_hash: str, pending: list[int],
         wait: bool = True) -> float:
    """Post this rank's hash at `step` and compare every ballot that is complete; raise on a
    mismatch; returns the seconds spent waiting for other replicas' hashes. With `wait`
    (before a commit) every pending ballot is waited for; without, the
    ones still missing a replica's hashes stay pending, so a vote between checkpoints costs a
    hash and a post, not a wait for the slower replica.

    Every rank decides on the same votes: a replica's posted hashes always count, a dropped
    replica's missing ones are excused.
    """
    global _waited_s
    _waited_s = 0.0
    group.board.set(f"vote/{step}/{group.replica}.{group.rank}", state_hash)
    pending.append(step)
    for at in list(pending):
        votes = _ballot(group, at, wait)
        if votes is None:
            continue
        pending.remove(at)
        if len(set(votes.values())) > 1:
            raise ReplicasDisagree(at, votes)
    return _waited_s


def announce_commit(group: RankGroup, step: int, ref: dict[str, Any]) -> None:
    group.board.set(f"committed/{step}", json.dumps(ref))


def await_commit(group: RankGroup, step: int, by: int) -> dict[str, Any] | None:
    """The ref replica `by` committed at `step`; None when `by` was dropped first."""
    key = f"committed/{step}"
    if _wait_for(group, [key], by, group.rdv.timeout) or _has(group, key):
        return dict(json.loads(group.board.get(key).decode()))
    return None
