"""Where the ranks of a data-parallel group meet: the coordinator's rendezvous server and what
travels to the ranks about it. No torch until a server is started, so the coordinator of a
single-rank run never imports it (training.distributed is the ranks' side)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import timedelta
from typing import Any

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


class CollectiveError(RuntimeError):
    """A collective failed or timed out: a peer died, hung, or the rendezvous is gone.

    The caller's state is what it was before the collective (nothing half-applied)."""


@dataclass(frozen=True)
class Rendezvous:
    """Where and under which name the ranks of one membership meet (JSON-able: it travels in
    task arguments)."""

    host: str
    """Host of the coordinator's TCPStore."""
    port: int
    """Its port."""
    namespace: str
    """Key prefix of this membership; a new one after every change of members."""
    world_size: int
    """Ranks in the group."""
    timeout_s: float
    """Bound on joining and on every collective, in seconds."""

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")

    @property
    def timeout(self) -> timedelta:
        return timedelta(seconds=self.timeout_s)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Rendezvous:
        return cls(**data)


class RendezvousServer:
    """The coordinator's TCPStore: outlives any rank, so a group can re-form after a death."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0,
                 timeout: timedelta = timedelta(seconds=60)) -> None:
        import torch.distributed as dist  # only a coordinator of several ranks serves one

        # wait_for_workers=False: ranks come and go; the server never waits for a head count.
        self._store = dist.TCPStore(host, port, is_master=True, wait_for_workers=False,
                                    timeout=timeout)
        self.host = host

    @property
    def port(self) -> int:
        return self._store.port

    def rendezvous(self, namespace: str, world_size: int, timeout: timedelta) -> Rendezvous:
        """A meeting point for `world_size` ranks under a fresh namespace."""
        return Rendezvous(self.host, self.port, namespace, world_size, timeout.total_seconds())

    def post(self, namespace: str, key: str, value: str) -> None:
        """Put a small value on a membership's board (ranks read it with `RankGroup.board`)."""
        self._store.set(f"{namespace}/board/{key}", value)

    def read(self, namespace: str, key: str) -> str | None:
        """A value on a membership's board, None when absent."""
        full = f"{namespace}/board/{key}"
        return self._store.get(full).decode() if self._store.check([full]) else None

    def close(self) -> None:
        """Stop serving (ranks still waiting on it fail their next call)."""
        del self._store


def batch_share(batch_size: int, world_size: int) -> int:
    """Rows of the global batch each rank takes; the batch must split into equal shares."""
    if world_size < 1 or batch_size % world_size:
        raise ValueError(f"batch size {batch_size} cannot be split into {world_size} equal "
                         f"shares (--workers must divide it)")
    return batch_size // world_size


def _one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"


__all__ = ["CollectiveError", "Rendezvous", "RendezvousServer", "batch_share"]
