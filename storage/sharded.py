"""Sharded saves on the store: several ranks write one checkpoint (DESIGN.md §8 "Writes").

``CheckpointStore`` gets these methods from ``ShardedSaves``; the plan, the receipts and their
checks live in ``storage.shards``. Every rank of a session writes its share into the staging
area ``.staging-<step>-<session>`` (a local folder each writer holds a shared flock on, or an
fsspec prefix); one rank commits it with the same publication as ``save`` (rename, or claim +
marker last), so a reader cannot tell how many ranks wrote a checkpoint.
"""

from __future__ import annotations

import errno
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from storage import faults, lease
from storage.errors import classify_os_error
from storage.hashing import bytes_hash
from storage.layout import ZARR_JSON, group_zarr_json, subgroups
from storage.manifest import MANIFEST, MARKER, Manifest, encode_manifest, encode_marker
from storage.names import step_dirname
from storage.packing import plan_checkpoint
from storage.refs import CheckpointRef
from storage.shards import (
    ShareReceipt,
    array_specs,
    assemble,
    plan_from_specs,
    plan_shards,
    share_area,
    write_share_files,
)
from storage.writer import SaveStats, check_inputs, staging_prefix

if TYPE_CHECKING:
    from storage.backend import Backend, Staging
    from storage.store import StoreConfig


class ShardedSaves:
    """plan_shards / write_share / commit_shares of ``CheckpointStore``."""

    backend: Backend
    config: StoreConfig
    last_save_stats: SaveStats | None

    if TYPE_CHECKING:  # provided by CheckpointStore
        url: str

        @staticmethod
        def _ckpt_dir(run_id: str) -> str: ...
        def _existing(self, run_id: str, step: int, final: str) -> CheckpointRef | None: ...
        def _published(
            self, run_id: str, step: int, staging: Staging, won: bool, manifest_hash: str,
            stats: SaveStats, t0: float,
        ) -> CheckpointRef: ...

    def plan_shards(self, tensors: Mapping[str, Any], world_size: int) -> list[list[str]]:
        """Which checkpoint files each rank writes (chunk files and array zarr.json documents,
        balanced by bytes); the same on every rank for the same names, dtypes and shapes."""
        return plan_shards(tensors, world_size, self.config.chunk_bytes, self.config.pack_bytes)

    def write_share(
        self, run_id: str, step: int, tensors: Mapping[str, Any], *, session: str, rank: int,
        world_size: int, state_hash: str | None = None,
    ) -> ShareReceipt:
        """Write rank's share of the checkpoint into the staging area of (step, session).

        ``tensors`` is the whole state (every rank holds all of it); only the plan's files for
        ``rank`` are written, durable before this returns. Files of an earlier attempt of the
        step (this session's or a dead one's) are reused when their hash matches. Nothing is
        visible to readers until ``commit_shares``. ``state_hash``, when the caller already
        computed it over these tensors, spares reading tensors outside the share.

        Raises:
            ValueError/TypeError: bad names, dtypes, session, rank or world size (nothing written).
            TransientStoreError/FatalStoreError: the filesystem failed; the files written so
                far stay for the next attempt.
        """
        t0 = time.perf_counter()
        if not isinstance(rank, int) or isinstance(rank, bool) or not 0 <= rank < world_size:
            raise ValueError(f"rank must be an int in [0, world_size={world_size}), got {rank!r}")
        ckpt_dir, step_name = self._ckpt_dir(run_id), step_dirname(step)
        area_name = share_area(step_name, session)
        check_inputs(tensors, {})
        specs = array_specs(tensors)
        chunk_bytes, pack_bytes = self.config.chunk_bytes, self.config.pack_bytes
        plan = plan_from_specs(specs, world_size, chunk_bytes, pack_bytes)
        layout_plan = plan_checkpoint(specs, chunk_bytes, pack_bytes)
        stats = SaveStats(durability=self.backend.durability())
        try:
            staging = self.backend.join_staging(ckpt_dir, area_name)
        except OSError as e:
            raise classify_os_error(e, self.url, f"writing share {rank} of {run_id}@{step}") from e
        try:
            others = [
                f"{ckpt_dir}/{n}" for n in self.backend.list_dir(ckpt_dir)
                if n.startswith(staging_prefix(step_name)) and n != area_name
            ]
            files, digest = write_share_files(
                self.backend, staging, f"{ckpt_dir}/{area_name}", others, tensors, layout_plan,
                set(plan[rank]), stats, self.config.io_threads, state_hash,
                self.previous_chunks(run_id, step),
            )
            faults.point("share-written")
            staging.make_durable()
        except OSError as e:
            raise classify_os_error(e, self.url, f"writing share {rank} of {run_id}@{step}") from e
        finally:
            staging.abandon()  # the files stay for the committer (or the next attempt)
        return ShareReceipt(
            run_id=run_id, step=step, session=session, rank=rank, world_size=world_size,
            chunk_bytes=chunk_bytes, pack_bytes=pack_bytes, arrays=tuple(specs), files=tuple(sorted(files.items())),
            state_hash=digest, bytes_written=stats.bytes_written, bytes_reused=stats.bytes_reused,
            chunks_written=stats.chunks_written, chunks_reused=stats.chunks_reused,
            files_written=stats.files_written, seconds=time.perf_counter() - t0,
            written_unix=time.time(),
        )

    def commit_shares(
        self, run_id: str, step: int, receipts: Sequence[ShareReceipt], metadata: dict, *,
        session: str, lease_epoch: int | None = None,
    ) -> CheckpointRef:
        """Commit the checkpoint every rank of ``session`` wrote a share of (one rank calls it).

        The receipts must be exactly one per rank of one plan, agreeing on state_hash; then the
        group documents, manifest and marker are written and the staging area published as
        ``save`` publishes (same exactly-one-winner guarantee, same "existing" outcome when
        the step is committed and verifies). ``last_save_stats`` sums the shares' I/O.
        ``lease_epoch`` fences the commit as in ``save``.

        Raises:
            LeaseLostError: the lease epoch is stale or expired (nothing committed; the
                shares stay; fatal).
            ShareError: a share missing, given twice, or not matching the plan (nothing committed).
            ValueError/TypeError: bad metadata or session.
            TransientStoreError/FatalStoreError: as ``save``; the shares stay for a retry.
        """
        t0 = time.perf_counter()
        ckpt_dir, step_name = self._ckpt_dir(run_id), step_dirname(step)
        final = f"{ckpt_dir}/{step_name}"
        area_name = share_area(step_name, session)
        check_inputs({}, metadata)
        merged = assemble(receipts, run_id, step, session)
        stats = SaveStats(durability=self.backend.durability())
        for r in receipts:
            stats.bytes_written += r.bytes_written
            stats.bytes_reused += r.bytes_reused
            stats.chunks_written += r.chunks_written
            stats.chunks_reused += r.chunks_reused
            stats.files_written += r.files_written
        self.last_save_stats = stats
        what = f"committing {run_id}@{step}"
        try:
            existing = self._existing(run_id, step, final)
            staging = self.backend.join_staging(ckpt_dir, area_name, exclusive=True)
        except OSError as e:
            raise classify_os_error(e, self.url, what) from e
        if existing is not None:
            staging.discard()  # the shares are not needed: the step is there and verifies
            stats.outcome, stats.seconds = "existing", time.perf_counter() - t0
            return existing
        try:
            self._check_share_files(f"{ckpt_dir}/{area_name}", merged.files)
            doc_hashes = dict(merged.array_docs)
            names = [e.layout.name for e in merged.entries]
            for group in subgroups(names):
                body = group_zarr_json()
                staging.write_file(f"{group}/{ZARR_JSON}", body)
                doc_hashes[f"{group}/{ZARR_JSON}"] = bytes_hash(body)
            root = group_zarr_json({"rebound": {"run_id": run_id, "step": step}, "metadata": metadata})
            staging.write_file(ZARR_JSON, root)
            doc_hashes[ZARR_JSON] = bytes_hash(root)
            manifest_bytes = encode_manifest(Manifest(
                run_id=run_id, step=step, metadata=metadata, arrays=merged.entries,
                documents=doc_hashes, state_hash=merged.state_hash, created_unix=merged.created_unix,
            ))
            staging.write_file(MANIFEST, manifest_bytes)
            stats.files_written += len(subgroups(names)) + 3  # groups, root, manifest, marker
            staging.make_durable()
            manifest_hash = bytes_hash(manifest_bytes)
            faults.point("before-commit")
            files = [*merged.files, *doc_hashes.keys() - merged.files.keys(), MANIFEST]
            won = staging.commit(final, MARKER, encode_marker(run_id, step, manifest_hash), files,
                                 fence=lease.fence(self.backend, run_id, lease_epoch))
        except OSError as e:
            staging.abandon()  # never discard: the other ranks' shares are reused by a retry
            raise classify_os_error(e, self.url, what) from e
        except BaseException:
            staging.abandon()
            raise
        return self._published(run_id, step, staging, won, manifest_hash, stats, t0)

    def _check_share_files(self, area: str, sizes: Mapping[str, int]) -> None:
        """Every file the receipts name is in the staging area at its size (cheap: no reads)."""

        def check(rel: str) -> None:
            got = self.backend.size(f"{area}/{rel}")
            if got != sizes[rel]:
                raise OSError(errno.ENOENT, f"{area}/{rel}: a share's file is "
                              f"{'missing' if got is None else f'{got} bytes, not {sizes[rel]}'}")

        with ThreadPoolExecutor(max_workers=self.config.io_threads) as pool:
            list(pool.map(check, sorted(sizes)))

