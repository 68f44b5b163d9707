"""Data-parallel collectives for the Trainer: ranks that meet through a rendezvous the
coordinator serves, average their gradients every step, and hand state to a peer.

Pure torch.distributed (gloo on CPU, NCCL on CUDA); no Prefect, no Dask. How it is used:

    server = RendezvousServer()                           # the coordinator, once per run
    rdv = server.rendezvous("run-a/m3", world_size=2, timeout=timedelta(seconds=30))
    group = RankGroup(rdv, rank)                          # every rank, with the same rdv
    trainer = Trainer(cfg, corpus, sync=group)            # averages gradients every step
    group.broadcast_state(trainer, src=0)                 # a replacement gets a survivor's state

A rendezvous namespace names one membership: when a rank is lost the coordinator hands out a new
namespace, so keys a dead attempt left behind are never read again, and the rendezvous itself
lives in the coordinator, not in a rank that can die.
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from training.loop import Trainer

from training.rendezvous import (  # re-exported: the ranks' side of the same protocol
    _LOOPBACK,
    CollectiveError,
    Rendezvous,
    RendezvousServer,
    _one_line,
    batch_share,
)

__all__ = ["CollectiveError", "RankGroup", "Rendezvous", "RendezvousServer", "batch_share"]


def _backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


class RankGroup:
    """This process's membership in one data-parallel group (one replica's row of ranks).

    torch keeps one default process group per process; a Dask worker runs one rank at a time,
    so a new membership destroys the old group first (rebuilt, never patched).

    With replicas (`row_size` < the rendezvous' world size) the default group spans every
    replica's ranks (world rank = replica x row_size + rank) and each replica trains on a
    subgroup of its own, so a rank lost in one replica breaks no other replica's collectives.
    `rank`, `world_size` and every collective of this object are the row's; `world()` gives a
    view over all replicas for agreeing on the start state, used only while every rank is up.
    """

    def __init__(self, rdv: Rendezvous, rank: int, device: torch.device | str = "cpu",
                 row_size: int | None = None) -> None:
        total = rdv.world_size
        row_size = row_size or total
        if row_size < 1 or total % row_size:
            raise ValueError(f"row size {row_size} does not divide a world of {total}")
        if not 0 <= rank < total:
            raise ValueError(f"rank {rank} is outside a world of {total}")
        self.rdv = rdv
        self.world_rank = rank
        self.world_total = total
        self.replica, self.rank = divmod(rank, row_size)
        self.world_size = row_size
        self.replicas = total // row_size
        self.device = torch.device(device)
        self._pg: Any = None
        """The row's subgroup (None: the default group is the row)."""
        self._offset = self.replica * row_size
        if rdv.host in _LOOPBACK:
            # gloo picks the interface of the host name otherwise; on one machine that can be
            # an address the other ranks cannot reach. Across machines the user's setting wins.
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        if dist.is_initialized():
            dist.destroy_process_group()
        try:
            client = dist.TCPStore(rdv.host, rdv.port, is_master=False, timeout=rdv.timeout)
            store = dist.PrefixStore(rdv.namespace + "/", client)
            self.board = dist.PrefixStore(rdv.namespace + "/board", client)
            """Small keys shared by every replica through the coordinator (votes, commits)."""
            dist.init_process_group(_backend_for(self.device), store=store, rank=rank,
                                    world_size=total, timeout=rdv.timeout)
            if self.replicas > 1 and row_size > 1:
                # Every rank creates every row's subgroup, in the same order (torch's rule).
                for r in range(self.replicas):
                    pg = dist.new_group(list(range(r * row_size, (r + 1) * row_size)),
                                        timeout=rdv.timeout)
                    if r == self.replica:
                        self._pg = pg
        except (RuntimeError, OSError, dist.DistError) as err:
            raise CollectiveError(f"rank {rank} could not join {rdv.namespace!r} at "
                                  f"{rdv.host}:{rdv.port}: {_one_line(err)}") from None

    def world(self) -> RankGroup:
        """A view of this membership over every replica's ranks (same processes, world ranks)."""
        if self.replicas == 1:
            return self
        view = object.__new__(RankGroup)
        view.__dict__.update(self.__dict__)
        view.rank, view.world_size, view.replica = self.world_rank, self.world_total, 0
        view.replicas, view._pg, view._offset = 1, None, 0
        return view

    @property
    def alive(self) -> bool:
        """Whether this group is still this process's default group."""
        return dist.is_initialized()

    def close(self) -> None:
        """Leave the group (idempotent)."""
        if dist.is_initialized():
            dist.destroy_process_group()

    # -- every step -----------------------------------------------------------------------

    def average_gradients(self, params: list[torch.nn.Parameter], loss: torch.Tensor) -> float:
        """Replace every gradient by its mean over the ranks; returns the mean loss.

        One all_reduce per dtype over a flat buffer (the loss rides along in the fp32 one), so a
        step costs one collective, not hundreds. Reduction order is fixed by the backend for a
        given world size, so every rank gets the same bits and the same N gives the same run.
        """
        by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for p in params:
            if p.grad is None:
                # Every rank must contribute the same layout; an unused parameter adds zeros.
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p)
        loss_value = loss.detach().float().reshape(1)
        by_dtype.setdefault(torch.float32, [])
        for dtype, group in by_dtype.items():
            parts = [p.grad.reshape(-1) for p in group]
            if dtype == torch.float32:
                parts.append(loss_value.to(self.device))
            flat = torch.cat(parts).to(self.device)
            self._all_reduce(flat)
            flat.div_(self.world_size)
            offset = 0
            for p in group:
                n = p.grad.numel()
                p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
                offset += n
            if dtype == torch.float32:
                loss_value = flat[offset:offset + 1]
        return float(loss_value.item())

    # -- membership changes -----------------------------------------------------------------

    def broadcast_state(self, trainer: Trainer, src: int) -> None:
        """Make every rank's trainer state equal to rank `src`'s (model, optimizer, cursor).

        The shapes and metadata travel as JSON, the bytes as one flat uint8 buffer: no pickle,
        and a replacement whose optimizer has no state yet receives all of it.
        """
        if self.rank == src:
            tensors, meta = trainer.capture()
            names = sorted(tensors)
            spec = {"meta": meta, "tensors": [
                [n, str(tensors[n].dtype).removeprefix("torch."), list(tensors[n].shape)]
                for n in names]}
            payload = json.dumps(spec).encode()
            flat = torch.cat([_as_bytes(tensors[n]) for n in names]) if names else \
                torch.empty(0, dtype=torch.uint8)
            sizes = torch.tensor([len(payload), flat.numel()], dtype=torch.int64)
        else:
            sizes = torch.zeros(2, dtype=torch.int64)
        self._broadcast(sizes, src)
        header = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if self.rank == src \
            else torch.empty(int(sizes[0]), dtype=torch.uint8)
        self._broadcast(header, src)
        if self.rank != src:
            flat = torch.empty(int(sizes[1]), dtype=torch.uint8)
        self._broadcast(flat, src)
        if self.rank == src:
            return
        spec = json.loads(bytes(header.numpy()).decode())
        tensors, offset = {}, 0
        for name, dtype_name, shape in spec["tensors"]:
            dtype = getattr(torch, dtype_name)
            n = _numel(shape) * torch.empty(0, dtype=dtype).element_size()
            tensors[name] = flat[offset:offset + n].view(dtype).reshape(shape)
            offset += n
        trainer.restore(tensors, spec["meta"])

    def all_gather_text(self, text: str) -> list[str]:
        """Every rank's `text` (a state_hash, say), in rank order."""
        return [str(t) for t in self.all_gather_json(text)]

    def all_gather_json(self, obj: Any) -> list[Any]:
        """Every rank's JSON-able `obj`, in rank order (share receipts, say): lengths first, then
        the bytes padded to the longest, so any size travels in two collectives."""
        data = json.dumps(obj).encode()
        length = torch.tensor([len(data)], dtype=torch.int64)
        lengths = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        self._all_gather(lengths, length)
        longest = max(int(n) for n in lengths)
        mine = torch.zeros(longest, dtype=torch.uint8)
        if data:
            mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        gathered = [torch.zeros(longest, dtype=torch.uint8) for _ in range(self.world_size)]
        self._all_gather(gathered, mine)
        return [json.loads(bytes(g[:int(n)].numpy()).decode())
                for g, n in zip(gathered, lengths, strict=True)]

    def broadcast_json(self, obj: Any, src: int) -> Any:
        """Rank `src`'s JSON-able `obj` on every rank (the committed checkpoint's ref, say)."""
        data = json.dumps(obj).encode() if self.rank == src else b""
        length = torch.tensor([len(data)], dtype=torch.int64)
        self._broadcast(length, src)
        buf = torch.frombuffer(bytearray(data), dtype=torch.uint8) if self.rank == src \
            else torch.empty(int(length[0]), dtype=torch.uint8)
        if int(length[0]):
            self._broadcast(buf, src)
        return json.loads(bytes(buf.numpy()).decode()) if int(length[0]) else None

    def barrier(self) -> None:
        """Wait for every rank (bounded by the rendezvous timeout)."""
        self._all_reduce(torch.zeros(1, device=self.device))

    # -- the collectives, with errors made ours -----------------------------------------------

    def _solo(self) -> bool:
        # A row of one rank inside a replicated world: its collectives are the identity.
        return self.world_size == 1 and self.world_total > 1 and self._pg is None

    def _all_reduce(self, t: torch.Tensor) -> None:
        if self._solo():
            return
        try:
            dist.all_reduce(t, group=self._pg)
        except (RuntimeError, dist.DistError) as err:
            raise CollectiveError(f"all_reduce failed on rank {self.rank}: {_one_line(err)}") \
                from None

    def _all_gather(self, out: list[torch.Tensor], t: torch.Tensor) -> None:
        if self._solo():
            out[0].copy_(t)
            return
        try:
            if self.device.type == "cuda":
                on_device = [o.to(self.device) for o in out]
                dist.all_gather(on_device, t.to(self.device), group=self._pg)
                for o, d in zip(out, on_device, strict=True):
                    o.copy_(d.cpu())
            else:
                dist.all_gather(out, t, group=self._pg)
        except (RuntimeError, dist.DistError) as err:
            raise CollectiveError(f"all_gather failed on rank {self.rank}: {_one_line(err)}") \
                from None

    def _broadcast(self, t: torch.Tensor, src: int) -> None:
        if self._solo():
            return
        # torch names the source by its rank in the default group, also for a subgroup.
        global_src = self._offset + src if self._pg is not None else src
        try:
            if self.device.type == "cuda":
                on_device = t.to(self.device)
                dist.broadcast(on_device, global_src, group=self._pg)
                t.copy_(on_device.cpu())
            else:
                dist.broadcast(t, global_src, group=self._pg)
        except (RuntimeError, dist.DistError) as err:
            raise CollectiveError(f"broadcast from rank {src} failed on rank {self.rank}: "
                                  f"{_one_line(err)}") from None


def _as_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n
