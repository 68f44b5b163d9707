"""CheckpointStore: the public face of the storage package (DESIGN.md §2).

Layout of a store::

    <store>/<run_id>/ckpt/<step, 12 digits>/     one Zarr v3 group per committed checkpoint
        zarr.json  manifest.json  COMMITTED  <array path>/zarr.json  <array path>/c/<i>/0...
    <store>/<run_id>/ckpt/.staging-<step>-<uuid>/ a writer's private area until it commits
    <store>/<run_id>/docs/<name>.json            small run-level JSON documents
"""

from __future__ import annotations

import errno
import json
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from storage import faults, lease
from storage.backend import Backend, Staging
from storage.checks import check_structure, scan
from storage.errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    FatalStoreError,
    StoreError,
    classify_os_error,
)
from storage.export import ExportFormat, write_export
from storage.manifest import MARKER, Manifest
from storage.names import parse_step_dirname, step_dirname, validate_doc_name, validate_run_id
from storage.packing import DEFAULT_PACK_BYTES, check_pack_bytes
from storage.reader import VerifyReport, load_tensors, open_manifest
from storage.refs import CheckpointRef
from storage.retention import steps_to_delete
from storage.sharded import ShardedSaves
from storage.writer import (
    STAGING_PREFIX,
    SaveStats,
    check_inputs,
    previous_chunks,
    staging_prefix,
    write_staging,
)

log = logging.getLogger("storage")
T = TypeVar("T")


@dataclass(frozen=True)
class StoreConfig:
    """How a store writes."""

    chunk_bytes: int = 64 << 20
    """Target chunk file size; 64 MiB measured best (bench/checkpoint.py, see the issue note)."""
    durability: str = "auto"
    """Local only: "syncfs" (one syncfs for the whole checkpoint), "fsync" (per file), "none"
    (tests of logic only), or "auto" (syncfs where the platform has it)."""
    staging_grace: timedelta = timedelta(seconds=5)
    """Local: an unlocked staging folder younger than this is left alone by cleanup; S3: a
    step without a marker whose newest object is younger than this is left alone by gc."""
    remote_stale_after: timedelta = timedelta(hours=1)
    """fsspec: a staging prefix older than this is considered abandoned (no locks there)."""
    io_threads: int = 4
    """Threads writing/reading chunk files; overlaps per-file latency (create, fsync)."""
    incremental: bool = False
    """A chunk equal to the same chunk of the previous committed checkpoint is linked (local)
    or copied server-side (fsspec) after its bytes are verified, not written again. Off by
    default: on a local store a linked file is one inode for both checkpoints, so bit rot in
    it corrupts both, and falling back past a corrupt checkpoint must then go further back."""
    pack_bytes: int = DEFAULT_PACK_BYTES
    """Tensors smaller than this are packed, one array per dtype, instead of an array each
    (storage.packing: a file and two folders fewer per tensor); 0 stores every tensor alone."""
    max_sharing: int = 3
    """Incremental saves on a local store: a file already shared by this many names (hard
    links: retained checkpoints, plus a dead writer's staging) is written anew instead of
    linked once more, so one rotten file corrupts at most this many checkpoints in a row, and
    keeping more than this many guarantees a fallback that does not contain it."""

    def __post_init__(self) -> None:
        if self.chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {self.chunk_bytes}")
        if self.io_threads < 1:
            raise ValueError(f"io_threads must be >= 1, got {self.io_threads}")
        check_pack_bytes(self.pack_bytes)
        if self.max_sharing < 2:
            raise ValueError(f"max_sharing must be >= 2 (2: link into one more checkpoint), "
                             f"got {self.max_sharing}")


@dataclass
class LoadedCheckpoint:
    """A loaded checkpoint: tensors (torch, on the requested device), metadata and its ref."""

    tensors: dict[str, Any]
    metadata: dict
    ref: CheckpointRef


class CheckpointStore(ShardedSaves):
    """Verified Zarr v3 checkpoints of training runs, on a local folder or an fsspec URL.

    Sharded saves (several ranks, one checkpoint): ``plan_shards``, ``write_share`` and
    ``commit_shares``, from ``storage.sharded``."""

    def __init__(self, backend: Backend, config: StoreConfig | None = None) -> None:
        self.backend = backend
        self.config = config or StoreConfig()
        self.last_save_stats: SaveStats | None = None

    @property
    def url(self) -> str:
        """Where the store lives."""
        return self.backend.url

    def __repr__(self) -> str:
        return f"CheckpointStore({self.url!r})"

    # ---- paths -------------------------------------------------------------------------
    @staticmethod
    def _ckpt_dir(run_id: str) -> str:
        return f"{validate_run_id(run_id)}/ckpt"

    def _step_dir(self, run_id: str, step: int) -> str:
        return f"{self._ckpt_dir(run_id)}/{step_dirname(step)}"

    @staticmethod
    def _doc_path(run_id: str, name: str) -> str:
        validate_doc_name(name)
        return f"{validate_run_id(run_id)}/docs/{name if name.endswith('.json') else name + '.json'}"

    # ---- listing -----------------------------------------------------------------------
    def runs(self) -> list[str]:
        """Run ids in the store, sorted."""
        out = []
        for name in self._io(lambda: self.backend.list_dir(""), "listing runs"):
            try:
                validate_run_id(name)
            except ValueError:
                continue
            children = self._io(lambda n=name: self.backend.list_dir(n), f"listing {name}")
            if "ckpt" in children or "docs" in children:
                out.append(name)
        return out

    def step_folders(self, run_id: str) -> list[int]:
        """Steps that have a folder, committed or not (a lost marker is damage to report)."""
        ckpt = self._ckpt_dir(run_id)
        names = self._io(lambda: self.backend.list_dir(ckpt), f"listing {ckpt}")
        return sorted(s for s in map(parse_step_dirname, names) if s is not None)

    def steps(self, run_id: str) -> list[int]:
        """Committed steps of a run (those with a commit marker), ascending.

        Raises:
            TransientStoreError/FatalStoreError: a marker could not be read: a step is never
                dropped from the list because reading it failed.
        """
        ckpt = self._ckpt_dir(run_id)
        return [
            s for s in self.step_folders(run_id)
            if self._io(lambda s=s: self.backend.exists(f"{ckpt}/{step_dirname(s)}/{MARKER}"), f"{ckpt}/{s}")
        ]

    # ---- save --------------------------------------------------------------------------
    def save(
        self, run_id: str, step: int, tensors: Mapping[str, Any], metadata: dict, *,
        lease_epoch: int | None = None,
    ) -> CheckpointRef:
        """Write and atomically commit one checkpoint; see the module doc for the layout.

        Idempotent: when ``step`` is already committed and verifies, returns its ref without
        writing. A committed step that fails verification is removed and written anew. When
        another writer commits the same step first, its checkpoint is verified and its ref
        returned. ``lease_epoch`` fences the commit (``storage.lease``): it is refused unless
        that epoch is the run's live lease when the commit is about to become visible; None
        commits unfenced (tools, tests of the storage layer).

        Raises:
            LeaseLostError: the lease epoch is stale or expired (nothing committed; fatal).
            ValueError/TypeError: bad names, dtypes or metadata (nothing written).
            TransientStoreError: the filesystem failed; nothing was committed, and the chunks
                written so far are reused by the next attempt.
            FatalStoreError: the storage refuses (full, read-only, no permission); nothing
                was committed.
        """
        t0 = time.perf_counter()
        ckpt_dir, step_name = self._ckpt_dir(run_id), step_dirname(step)
        final = f"{ckpt_dir}/{step_name}"
        check_inputs(tensors, metadata)
        stats = SaveStats(durability=self.backend.durability())
        self.last_save_stats = stats
        try:
            existing = self._existing(run_id, step, final)
            if existing is not None:
                stats.outcome, stats.seconds = "existing", time.perf_counter() - t0
                return existing
            staging = self.backend.begin_staging(ckpt_dir, staging_prefix(step_name))
        except OSError as e:
            raise classify_os_error(e, self.url, f"saving {run_id}@{step}") from e
        if staging is None:  # S3: another writer committed the step while we waited for it
            return self._published(run_id, step, None, False, "", stats, t0)
        try:
            staged = write_staging(
                self.backend, staging, run_id, step, ckpt_dir, step_name, tensors, metadata,
                self.config.chunk_bytes, stats, self.config.io_threads,
                previous=self.previous_chunks(run_id, step), pack_bytes=self.config.pack_bytes,
            )
            faults.point("before-commit")
            won = staging.commit(final, MARKER, staged.marker,
                                 fence=lease.fence(self.backend, run_id, lease_epoch))
        except OSError as e:
            err = classify_os_error(e, self.url, f"saving {run_id}@{step}")
            if isinstance(err, FatalStoreError):
                staging.discard()  # no retry will reuse it; give the space back
            else:
                staging.abandon()
            raise err from e
        except Exception:
            staging.discard()
            raise
        return self._published(run_id, step, staging, won, staged.manifest_hash, stats, t0)

    def previous_chunks(self, run_id: str, step: int) -> dict[str, tuple[str, int, str]]:
        """The chunk files of the newest committed checkpoint before ``step`` (incremental
        saves: an unchanged chunk is linked from there). Empty when there is none, when
        incremental saves are off, or when its manifest cannot be read: a save never fails
        because an older checkpoint is damaged, it only writes more."""
        if not self.config.incremental:
            return {}
        try:
            earlier = [s for s in self.steps(run_id) if s < step]
            if not earlier:
                return {}
            manifest, _ = self.read_manifest(run_id, earlier[-1])
        except Exception as e:  # noqa: BLE001 - any damage: just write everything
            log.info("incremental save of %s@%s writes every chunk: %s", run_id, step, e)
            return {}
        chunks = previous_chunks(self._ckpt_dir(run_id), step_dirname(earlier[-1]), manifest)
        cap = self.config.max_sharing
        return {rel: c for rel, c in chunks.items() if 0 < self.backend.sharers(c[0]) < cap}

    def _published(
        self, run_id: str, step: int, staging: Staging | None, won: bool, manifest_hash: str,
        stats: SaveStats, t0: float,
    ) -> CheckpointRef:
        """The ref after a commit attempt: ours when it won, else the winner's once verified."""
        stats.seconds = time.perf_counter() - t0
        if won:
            stats.outcome = "committed"
            return CheckpointRef(run_id, step, manifest_hash)
        if staging is not None:
            staging.discard()
        stats.outcome = "lost-race"
        report = self.verify(run_id, step)
        if not report.ok:
            raise report.problems[0]
        assert report.ref is not None
        return report.ref

    def _existing(self, run_id: str, step: int, final: str) -> CheckpointRef | None:
        """The ref of ``step`` when it is committed and verifies; None when there is room to
        commit it (a markerless local folder or a corrupt commit was removed).

        Removals happen under the step lock and only if the step is still what we looked at:
        never another writer's fresh commit (it may land between any two of our reads).
        """
        b = self.backend
        for _ in range(3):
            marker = self._read_marker(final)
            if marker is None:
                faults.point("existing-no-marker")
                if not (b.atomic_commit and b.exists(final)):
                    return None
                # Commits are renames of complete folders, so a step folder without its marker
                # is damage; it would also block our rename.
                with b.step_lock(final):
                    if self._read_marker(final) is None and b.exists(final):
                        log.warning("step %s of run %s has no commit marker; replacing it", step, run_id)
                        b.remove_tree(final)
                        return None
                continue  # a commit landed meanwhile: look at it
            try:
                report = self.verify(run_id, step)
            except CheckpointNotFoundError:
                continue  # removed meanwhile
            if report.ok:
                return report.ref
            with b.step_lock(final):
                if self._read_marker(final) == marker:
                    log.warning("step %s of run %s is committed but corrupt (%s); rewriting it",
                                step, run_id, report.problems[0])
                    self._delete_step(run_id, step)
                    return None
        raise OSError(errno.EBUSY, f"{final} keeps changing while this writer looks at it")

    def _read_marker(self, final: str) -> bytes | None:
        """The commit marker's bytes; None only when it is absent (read errors raise)."""
        try:
            return self.backend.read_bytes(f"{final}/{MARKER}")
        except FileNotFoundError:
            return None

    # ---- load / verify -----------------------------------------------------------------
    def read_manifest(self, run_id: str, step: int) -> tuple[Manifest, CheckpointRef]:
        """The manifest of a committed step (checked against its marker) and the step's ref."""
        return open_manifest(self.backend, run_id, step, self._step_dir(run_id, step))

    def ref(self, run_id: str, step: int) -> CheckpointRef:
        """The reference of a committed step (its manifest checked against the marker)."""
        return self.read_manifest(run_id, step)[1]

    def checkpoint_url(self, run_id: str, step: int) -> str:
        """Where a checkpoint's Zarr group lives (a path or URL zarr-python can open)."""
        return f"{self.url.rstrip('/')}/{self._step_dir(run_id, step)}"

    def latest_verified_ref(
        self, run_id: str, on_corrupt: Callable[[CorruptCheckpointError], None] | None = None
    ) -> CheckpointRef | None:
        """Like load_latest_verified, without keeping the tensors: the newest verified step.

        The same checks as load_latest_verified (``storage.checks``, then every chunk hashed).
        """

        def verified(step: int) -> CheckpointRef:
            report = self.verify(run_id, step)
            if not report.ok:
                raise report.problems[0]
            assert report.ref is not None
            return report.ref

        return self._newest(run_id, verified, on_corrupt)

    def latest_committed_ref(
        self, run_id: str, on_corrupt: Callable[[CorruptCheckpointError], None] | None = None
    ) -> CheckpointRef | None:
        """The newest step that passes every check except reading and hashing chunk bytes.

        Checks (``storage.checks``): marker and manifest agree; the manifest's schema (types,
        dtypes, shapes, chunk counts); marker, manifest and root zarr.json name this run and
        step; every zarr.json present with its hash; every chunk file present with the
        manifest's size; no file the manifest does not list. A verified load of the returned
        step (``load``) then only has the chunk hashes left to find wrong. Each step passed over
        is reported through ``on_corrupt`` (or logged), newest first.
        """

        def committed(step: int) -> CheckpointRef:
            st = check_structure(self.backend, run_id, step, self._step_dir(run_id, step), self.config.io_threads)
            if st.problems:
                raise st.problems[0]
            return st.ref

        return self._newest(run_id, committed, on_corrupt)

    def _newest(
        self, run_id: str, check: Callable[[int], T],
        on_corrupt: Callable[[CorruptCheckpointError], None] | None,
    ) -> T | None:
        """``check(step)`` of the newest step that passes it, falling back past corrupt ones.

        On a local store a step folder without its commit marker counts as corrupt (commits are
        atomic renames, so that is damage); on fsspec it is a write in flight and is skipped.
        """
        candidates = self.step_folders(run_id) if self.backend.atomic_commit else self.steps(run_id)
        for step in reversed(candidates):
            try:
                return check(step)
            except CorruptCheckpointError as e:
                if on_corrupt is not None:
                    on_corrupt(e)
                else:
                    log.warning("skipping corrupt checkpoint: %s", e)
            except CheckpointNotFoundError:
                continue  # deleted while we looked
        return None

    def read_metadata(self, run_id: str, step: int) -> dict:
        """Training metadata of a checkpoint, without reading any tensor."""
        return self.read_manifest(run_id, step)[0].metadata

    def load(self, run_id: str, step: int, device: str = "cpu", verify: bool = True) -> LoadedCheckpoint:
        """Read one checkpoint into torch tensors on ``device``, verifying every chunk.

        Raises:
            CheckpointNotFoundError: no checkpoint at that step.
            CorruptCheckpointError: anything fails verification (names run, step, array, chunk).
            TransientStoreError: the filesystem failed.
        """
        step_dir = self._step_dir(run_id, step)
        st = check_structure(self.backend, run_id, step, step_dir, self.config.io_threads)
        if st.problems:
            raise st.problems[0]  # before any tensor is allocated
        tensors = load_tensors(self.backend, st.manifest, step_dir, device, verify, self.config.io_threads)
        return LoadedCheckpoint(tensors=tensors, metadata=st.manifest.metadata, ref=st.ref)

    def load_latest_verified(
        self,
        run_id: str,
        device: str = "cpu",
        on_corrupt: Callable[[CorruptCheckpointError], None] | None = None,
    ) -> LoadedCheckpoint | None:
        """The newest checkpoint that verifies, falling back past corrupt ones; None if none.

        Each corrupt checkpoint passed over is reported through ``on_corrupt`` (or logged).
        The same checks as latest_verified_ref and verify (``storage.checks``, then every
        chunk hashed as it is read). On a local store a step folder without its commit marker
        counts as corrupt (commits are atomic renames, so that is damage); on fsspec it is a
        write in flight and is skipped.
        """
        return self._newest(run_id, lambda step: self.load(run_id, step, device=device), on_corrupt)

    def verify(self, run_id: str, step: int) -> VerifyReport:
        """Check every chunk and document of one checkpoint; problems are collected, not raised.

        Raises:
            CheckpointNotFoundError: no checkpoint at that step.
        """
        return scan(self.backend, run_id, step, self._step_dir(run_id, step), self.config.io_threads)

    def state_hash(self, run_id: str, step: int) -> str:
        """state_hash recomputed from the stored bytes (verifying them on the way)."""
        report = self.verify(run_id, step)
        if not report.ok:
            raise report.problems[0]
        assert report.state_hash is not None
        return report.state_hash

    # ---- retention ---------------------------------------------------------------------
    def gc(
        self,
        run_id: str,
        keep_last: int = 3,
        keep_every: int | None = None,
        protect: Iterable[int] = (),
        just_committed: CheckpointRef | None = None,
    ) -> list[int]:
        """Delete checkpoints the retention policy lets go, and dead writers' staging folders.

        The newest checkpoint that verifies is always kept (it is verified here, a full read),
        so a corrupt newest step never costs the last good one. ``just_committed``: the ref a
        save by this caller has just returned (every chunk hashed from memory as it was
        written): when it is still the newest and its marker still names it, it counts as
        verified without being read back, which spares every save of a training run a full
        read of what it wrote.

        Returns:
            The deleted steps, ascending.
        """
        steps_to_delete([], keep_last, keep_every)  # validate before touching anything
        protect = set(protect)
        steps = self.steps(run_id)
        newest_verified = None
        for step in reversed(steps):
            if just_committed is not None and step == just_committed.step and \
                    self.ref(run_id, step) == just_committed:
                newest_verified = step
                break
            if self.verify(run_id, step).ok:
                newest_verified = step
                break
        doomed = steps_to_delete(steps, keep_last, keep_every, protect, newest_verified)
        for step in doomed:
            self._delete_step(run_id, step)
        self.clean_staging(run_id)
        return doomed

    def clean_staging(self, run_id: str) -> list[str]:
        """Remove staging folders of dead writers (and leftovers of interrupted deletes)."""
        ckpt = self._ckpt_dir(run_id)
        removed = []
        for prefix in (STAGING_PREFIX, ".deleting-"):
            for rel in self.backend.stale_stagings(ckpt, prefix):
                log.info("removing stale %s", rel)
                self.backend.remove_tree(rel)
                removed.append(rel)
        # Object stores whose saves write straight to the step's keys (storage.s3): a step
        # without a marker that nobody is writing is a dead write.
        collect = getattr(self.backend, "collect_unmarked_steps", None)
        if collect is not None:
            removed += collect(ckpt, MARKER)
        return removed

    def _delete_step(self, run_id: str, step: int) -> None:
        step_dir = self._step_dir(run_id, step)
        if not self.backend.atomic_commit:
            # Marker first: readers stop trusting the step before any chunk disappears.
            self.backend.remove_tree(f"{step_dir}/{MARKER}")
        self.backend.remove_tree(step_dir)

    # ---- export ------------------------------------------------------------------------
    def export(
        self, run_id: str, step: int, out_path: str, fmt: ExportFormat = "safetensors",
        prefix: str | None = None,
    ) -> None:
        """Write a verified checkpoint as safetensors or a torch state dict file.

        ``prefix`` (e.g. "model/") keeps only names under it, with the prefix removed, which
        gives a state dict a model's ``load_state_dict`` accepts.
        """
        if fmt not in ("safetensors", "torch"):
            raise ValueError(f"format must be 'safetensors' or 'torch', got {fmt!r}")
        ckpt = self.load(run_id, step)
        tensors = ckpt.tensors
        if prefix:
            tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            if not tensors:
                raise ValueError(f"no tensor names start with {prefix!r}")
        write_export(tensors, ckpt.metadata, out_path, fmt)

    # ---- run-level JSON documents ------------------------------------------------------
    def write_json(self, run_id: str, name: str, obj: Any) -> None:
        """Write a small JSON document beside the run's checkpoints, atomically."""
        data = json.dumps(obj, indent=1).encode()
        self._io(lambda: self.backend.write_atomic(self._doc_path(run_id, name), data), name)

    def read_json(self, run_id: str, name: str, default: Any = None) -> Any:
        """Read a run-level JSON document; ``default`` when it does not exist."""
        path = self._doc_path(run_id, name)
        try:
            data = self.backend.read_bytes(path)
        except FileNotFoundError:
            return default
        except OSError as e:
            raise classify_os_error(e, self.url, f"reading {path}") from e
        try:
            return json.loads(data)
        except ValueError as e:
            raise StoreError(f"{path} is not valid JSON: {e}") from None

    def create_json_exclusive(self, run_id: str, name: str, obj: Any) -> bool:
        """Create a JSON document only if none exists; True when this call created it.

        Local stores make this atomic (link(2)), S3 a conditional put (If-None-Match: *); on
        other fsspec stores it is check-then-put under a claim.
        """
        data = json.dumps(obj, indent=1).encode()
        return self._io(lambda: self.backend.create_exclusive(self._doc_path(run_id, name), data), name)

    def list_json(self, run_id: str, folder: str) -> list[tuple[str, Any]]:
        """(name, document) of every JSON document in one folder of the run's documents, sorted."""
        folder = folder.strip("/")
        validate_doc_name(folder)
        out = []
        for entry in sorted(self.backend.list_dir(f"{validate_run_id(run_id)}/docs/{folder}")):
            if entry.endswith(".json"):
                name = f"{folder}/{entry.removesuffix('.json')}"
                doc = self.read_json(run_id, name)
                if doc is not None:
                    out.append((name, doc))
        return out

    def delete_run(self, run_id: str) -> None:
        """Remove a run with all its checkpoints and documents (``--fresh``).

        Its lease (``storage.lease``) stays: the coordinator starting the run over holds it,
        and lease epochs must keep counting up (a stale coordinator's epoch must not become
        current again)."""
        run = validate_run_id(run_id)
        for name in self._io(lambda: self.backend.list_dir(run), run):
            if name != lease.LEASE_DIR:
                self._io(lambda n=name: self.backend.remove_tree(f"{run}/{n}"), run)

    def _io(self, fn: Callable[[], Any], what: str) -> Any:
        try:
            return fn()
        except OSError as e:
            raise classify_os_error(e, self.url, what) from e


def open_store(url: str = "./runs", **config: Any) -> CheckpointStore:
    """Open a store: a local path (default) or any fsspec URL such as ``memory://name``.

    Keyword arguments go to StoreConfig (chunk_bytes, durability, staging_grace, ...).
    """
    cfg = StoreConfig(**config)
    if "://" not in url or url.startswith("file://"):
        from storage.localfs import LocalBackend

        path = url.removeprefix("file://")
        return CheckpointStore(LocalBackend(path, cfg.durability, cfg.staging_grace), cfg)
    if url.startswith(("s3://", "s3a://")):
        from storage.s3 import S3Backend  # needs the optional "s3" extra (s3fs)

        return CheckpointStore(S3Backend(url, cfg.remote_stale_after, cfg.staging_grace), cfg)
    from storage.fsspecfs import FsspecBackend

    if url.startswith("flaky://"):
        import storage.flaky  # noqa: F401  (registers the protocol with fsspec)

    return CheckpointStore(FsspecBackend(url, cfg.remote_stale_after), cfg)
