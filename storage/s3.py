"""S3 backend (``s3://bucket/prefix``, the optional ``s3`` extra): data straight to its final
keys, one winner by a conditional create of the commit marker.

Endpoint and credentials come from where a user already sets them: ``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY`` (and the rest of botocore's chain), or fsspec's
``FSSPEC_S3_*`` variables (e.g. ``FSSPEC_S3_ENDPOINT_URL``). The layout is DESIGN.md section 2's,
byte for byte the one the other backends write.

How a save publishes, on an object store that has no rename:

1. **Intent.** The writer takes the step's *write intent*: a small object
   ``<run>/ckpt/.writer-<step>-<generation>`` created with ``If-None-Match: *``. Only its holder
   writes under ``<run>/ckpt/<step>/``; a second writer of the step waits until the step is
   committed (then it reports "already committed by another writer" and writes nothing) or the
   intent goes stale (then it takes the next generation, again conditionally: one taker wins).
2. **Data.** The holder writes chunks, ``zarr.json`` documents and the manifest straight to
   their final keys: a checkpoint is uploaded once, never staged and copied. Readers ignore the
   step meanwhile, since it has no marker (``CheckpointStore.steps`` finds steps by marker).
3. **Commit.** The lease fence runs, then the marker ``COMMITTED`` is created with
   ``If-None-Match: *``. The server answers 412 to every create but the first, so exactly one
   commit of a step wins even if two writers ever believed they held the intent (a writer that
   was stalled past the stale age and overtaken). The loser touches none of the winner's keys.

An intent is *stale* when its holder is a process of this host that has exited (pid and its
start time, as claims and leases tell), or, from another host, when it is older than the
store's ``remote_stale_after`` (default 1 h: a writer on another host that takes longer than
that to write one checkpoint can be overtaken; a late chunk of its would then fail the new
checkpoint's hashes, which loading detects). Sharded saves (several ranks) keep their shared
staging prefix and copy it under the intent, server-side.

A step folder without a marker is a write that died (or one in flight). ``gc`` collects it
(``collect_unmarked_steps``) when nobody is writing it, decided by taking its intent itself
(so no writer can start while gc deletes), and its newest object is older than the store's
``staging_grace``. Listings: SeaweedFS keeps deleted "folders" in delimiter listings for
minutes, so steps are always confirmed by their marker object, never by folder names; the
listings cache is off, since other processes write the same prefixes.
"""

from __future__ import annotations

import errno
import json
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import xxhash

from storage import faults
from storage.backend import ChunkSizeError, Hasher, write_blocks
from storage.claims import _pid_alive, claimant
from storage.fsspecfs import FsspecBackend, FsspecStaging
from storage.names import parse_step_dirname
from storage.writer import STAGING_PREFIX

log = logging.getLogger("storage")

WRITER_PREFIX = ".writer-"
_MAX_CONFLICT_RETRIES = 20


def _precondition_failed(err: BaseException) -> bool:
    """True for S3's 412 to ``If-None-Match: *``: the key already exists.

    s3fs maps it to FileExistsError only when the server names the condition (AWS does);
    SeaweedFS answers a plain PreconditionFailed, which s3fs turns into OSError(EINVAL).
    """
    if isinstance(err, FileExistsError):
        return True
    response = getattr(err.__cause__, "response", None) or {}
    code = response.get("Error", {}).get("Code")
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "412") or status == 412


def _conflict(err: BaseException) -> bool:
    """AWS's 409 ConditionalRequestConflict: a concurrent conditional write; retry it."""
    response = getattr(err.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") == "ConditionalRequestConflict" or \
        response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 409


@dataclass(frozen=True)
class Intent:
    """One writer's hold on a step's keys: which generation, and the token that proves it ours."""

    parent: str
    step_name: str
    generation: int
    token: str

    @property
    def path(self) -> str:
        return f"{self.parent}/{intent_name(self.step_name, self.generation)}"


def intent_name(step_name: str, generation: int) -> str:
    """Object name of a step's write intent of one generation (beside the step folder)."""
    return f"{WRITER_PREFIX}{step_name}-{generation:06d}"


class S3Backend(FsspecBackend):
    """Checkpoints on S3 (or any S3-compatible server with conditional writes)."""

    def __init__(
        self, url: str, stale_after: timedelta = timedelta(hours=1),
        grace: timedelta = timedelta(seconds=5),
    ) -> None:
        # Other processes write the same prefixes: a cached listing would hide their intents.
        super().__init__(url, stale_after, use_listings_cache=False)
        self._grace_s = grace.total_seconds()
        # Waiting for another writer of the same step: as long as its intent can stay live.
        self._wait_budget_s = max(60.0, self._stale_s)

    # ---- conditional create ----------------------------------------------------------------
    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Put ``data`` only if ``path`` does not exist (``If-None-Match: *``); True if created."""
        for _ in range(_MAX_CONFLICT_RETRIES):
            try:
                self.fs.pipe_file(self.p(path), bytes(data), mode="create")
                return True
            except OSError as e:
                if _precondition_failed(e):
                    return False
                if not _conflict(e):
                    raise
            time.sleep(random.uniform(0.01, 0.05))  # AWS: retry a 409 after a short pause
        raise OSError(errno.EBUSY, f"{path}: conditional create kept conflicting")

    # ---- write intents ---------------------------------------------------------------------
    def _generations(self, parent: str, step_name: str) -> list[int]:
        prefix = f"{WRITER_PREFIX}{step_name}-"
        gens = []
        for name in self.list_dir(parent):
            if name.startswith(prefix) and name[len(prefix):].isdigit():
                gens.append(int(name[len(prefix):]))
        return sorted(gens)

    def _read_intent(self, path: str) -> dict | None:
        try:
            doc = json.loads(self.read_bytes(path))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # puts are atomic: an unparsable intent is garbage, not a write in flight
        return doc if isinstance(doc, dict) else {}

    def _live(self, path: str) -> bool:
        doc = self._read_intent(path)
        if not doc:
            return False
        if doc.get("host") == claimant()["host"]:
            return _pid_alive(doc.get("pid"), doc.get("pid_start"))
        try:
            return time.time() - float(doc["unix"]) < self._stale_s
        except (KeyError, TypeError, ValueError):
            return False

    def take_intent(
        self, parent: str, step_name: str, give_up: Callable[[], bool], who: str = "writer",
    ) -> Intent | None:
        """Hold the step's write intent (see the module doc); None when ``give_up()`` turned
        true while another live writer held it.

        Raises:
            TimeoutError: another writer kept it live for longer than the wait budget.
        """
        deadline = time.monotonic() + self._wait_budget_s
        delay_s = 0.01
        waited_on = None
        token = uuid.uuid4().hex
        while True:
            gens = self._generations(parent, step_name)
            newest = gens[-1] if gens else 0
            current = f"{parent}/{intent_name(step_name, newest)}"
            if newest and self._live(current):
                if give_up():
                    return None
                if waited_on != current:
                    log.info("%s/%s is being written by another writer (%s); waiting", parent,
                             step_name, current)
                    waited_on = current
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{parent}/{step_name} stays held by {current}")
                time.sleep(delay_s)
                delay_s = min(delay_s * 2, 0.2)
                continue
            intent = Intent(parent, step_name, newest + 1, token)
            doc = {**claimant(), "unix": time.time(), "token": token, "who": who}
            if self.create_exclusive(intent.path, json.dumps(doc).encode()):
                if newest:
                    log.info("took over %s/%s from a stale intent (%s)", parent, step_name, current)
                return intent
            # Another writer took this generation first: look again.

    def holds(self, intent: Intent) -> bool:
        """True while ``intent`` is the step's newest generation and still ours."""
        gens = self._generations(intent.parent, intent.step_name)
        if not gens or gens[-1] != intent.generation:
            return False
        doc = self._read_intent(intent.path)
        return bool(doc) and doc.get("token") == intent.token

    def release(self, intent: Intent) -> None:
        """Drop our intent and the stale generations below it (best effort)."""
        for gen in self._generations(intent.parent, intent.step_name):
            if gen > intent.generation:
                continue  # someone took over from us: theirs
            path = f"{intent.parent}/{intent_name(intent.step_name, gen)}"
            if gen == intent.generation and (self._read_intent(path) or {}).get("token") != intent.token:
                continue
            try:
                self.remove_tree(path)
            except OSError as e:
                log.warning("could not remove write intent %s: %s", path, e)

    @contextmanager
    def intent(self, final: str, give_up: Callable[[], bool], who: str = "writer") -> Iterator[Intent | None]:
        """``take_intent`` for the step folder ``final``, released on leaving the ``with``."""
        parent, step_name = final.rsplit("/", 1)
        held = self.take_intent(parent, step_name, give_up, who)
        try:
            yield held
        finally:
            if held is not None:
                self.release(held)

    def publish(
        self, intent: Intent, final: str, marker_name: str, marker: bytes,
        fence: Callable[[], None] | None,
    ) -> bool:
        """The commit point: fence, then the marker's conditional create; False when another
        writer's marker is there (its files stay untouched)."""
        if not self.holds(intent):
            raise OSError(errno.EBUSY, f"{final}: another writer took the step over (this one "
                          "was stalled past the stale age); not committing")
        if fence is not None:
            fence()  # right before the marker: refuse a stale lease epoch
        if self.create_exclusive(f"{final}/{marker_name}", marker):
            return True
        log.info("%s already committed by another writer", final)
        return False

    # ---- stagings --------------------------------------------------------------------------
    def begin_staging(self, parent: str, prefix: str) -> DirectStaging | None:
        """Take the step's intent and write straight into its folder; None when another writer
        committed the step while this one waited for it (nothing written)."""
        step_name = prefix.removeprefix(STAGING_PREFIX).rstrip("-")
        final = f"{parent}/{step_name}"
        held = self.take_intent(parent, step_name, lambda: self._marked(final))
        if held is None:
            log.info("%s already committed by another writer", final)
            return None
        if self._marked(final):  # committed between our look and our intent
            self.release(held)
            log.info("%s already committed by another writer", final)
            return None
        try:
            earlier = {k[len(self.p(final)) + 1:]: int(v["size"])
                       for k, v in self.fs.find(self.p(final), detail=True).items()
                       if v.get("type") == "file"}
        except BaseException:
            self.release(held)
            raise
        return DirectStaging(self, final, held, earlier)

    def join_staging(self, parent: str, name: str, exclusive: bool = False) -> ShareStaging:
        return ShareStaging(self, f"{parent}/{name}")

    def _marked(self, final: str) -> bool:
        return self.exists(f"{final}/COMMITTED")

    # ---- collecting dead writes ----------------------------------------------------------
    def stale_stagings(self, parent: str, prefix: str) -> list[str]:
        out = super().stale_stagings(parent, prefix)
        if prefix == STAGING_PREFIX:
            # Intents whose step is gone and whose holder is dead (a writer killed before it
            # wrote anything, or a release that failed).
            for name in self.list_dir(parent):
                if name.startswith(WRITER_PREFIX) and not self._live(f"{parent}/{name}"):
                    step_name = name[len(WRITER_PREFIX):].rsplit("-", 1)[0]
                    if not self.exists(f"{parent}/{step_name}/COMMITTED") and \
                            not self.list_files(f"{parent}/{step_name}"):
                        out.append(f"{parent}/{name}")
        return out

    def collect_unmarked_steps(self, parent: str, marker_name: str) -> list[str]:
        """Remove step folders without a marker that nobody is writing; the removed paths.

        Not being written = this call can take the step's intent (none live: see the module
        doc), and nothing under it is younger than the grace (a retry of the same writer comes
        back within it). Held while deleting, so no writer starts on the step meanwhile.
        """
        removed = []
        for name in self.list_dir(parent):
            if parse_step_dirname(name) is None:
                continue
            final = f"{parent}/{name}"
            if self.exists(f"{final}/{marker_name}"):
                continue
            with self.intent(final, give_up=lambda: True, who="gc") as held:
                if held is None or self.exists(f"{final}/{marker_name}"):
                    continue  # being written right now, or committed meanwhile
                newest = self._newest_unix(final)
                if newest is None:
                    continue  # a deleted folder a listing still shows (SeaweedFS), or empty
                if time.time() - newest < self._grace_s:
                    continue
                log.info("removing %s: no commit marker, nobody writing it", final)
                self.remove_tree(final)
                removed.append(final)
        return removed

    def _newest_unix(self, path: str) -> float | None:
        """LastModified of the newest object under ``path``; None when there is none."""
        found = self.fs.find(self.p(path), detail=True)
        stamps = [v.get("LastModified") for v in found.values() if v.get("type") == "file"]
        stamps = [s for s in stamps if isinstance(s, datetime)]
        if not stamps:
            return None if not found else time.time()
        return max(s if s.tzinfo else s.replace(tzinfo=UTC) for s in stamps).timestamp()


class DirectStaging(FsspecStaging):
    """A save written straight into its step folder, under the step's write intent."""

    def __init__(self, backend: S3Backend, final: str, intent: Intent, earlier: dict[str, int]) -> None:
        # No FsspecStaging.__init__: its ".started" file would be a stray file of the step.
        self._b = backend
        self._s3 = backend
        self.path = final
        self._files = []
        self._intent: Intent | None = intent
        self._earlier = earlier  # files a dead writer of this step left: path -> size

    def write_chunk(
        self, relpath: str, data: memoryview, pad: int,
        hashers: Sequence[Hasher], data_hashers: Sequence[Hasher],
    ) -> int:
        """Write one chunk to its final key, unless a dead writer's object there already holds
        exactly these bytes (same size, same xxh3-128): then it is kept, not uploaded again."""
        nbytes = len(data) + pad
        if self._earlier.get(relpath) == nbytes:
            mine, theirs = xxhash.xxh3_128(), xxhash.xxh3_128()
            write_blocks(lambda blk: len(blk), data, pad, (*hashers, mine), data_hashers)
            try:
                self._b.read_chunk(f"{self.path}/{relpath}", nbytes, nbytes, None, [theirs])
            except (OSError, ChunkSizeError):
                pass
            else:
                if theirs.digest() == mine.digest():
                    self._files.append(relpath)
                    return 0  # nothing uploaded
            return super().write_chunk(relpath, data, pad, (), ())
        return super().write_chunk(relpath, data, pad, hashers, data_hashers)

    def commit(
        self, final: str, marker_name: str, marker: bytes, files: Sequence[str] | None = None,
        fence: Callable[[], None] | None = None,
    ) -> bool:
        if final != self.path or self._intent is None:
            raise ValueError(f"this staging writes {self.path}, not {final}")
        b = self._s3
        # A dead writer of this step may have left files this save did not write (another
        # layout): they would be strays in the checkpoint.
        strays = set(b.list_files(final)) - set(self._files) - {marker_name}
        for rel in sorted(strays):
            b.remove_tree(f"{final}/{rel}")
        faults.point("mid-copy")  # where a staged commit would be copying: nothing to copy
        won = b.publish(self._intent, final, marker_name, marker, fence)
        self._let_go()  # on an exception the store's discard/abandon lets go
        return won

    def abandon(self) -> None:
        # The files stay (a retry rewrites them; gc collects them once stale).
        self._let_go()

    def discard(self) -> None:
        """Remove what we wrote, only while we still hold the intent and no marker is there:
        after a lost race the step's keys are the winner's."""
        intent, b = self._intent, self._s3
        if intent is not None and b.holds(intent) and not b._marked(self.path):
            b.remove_tree(self.path)
        self._let_go()

    def _let_go(self) -> None:
        if self._intent is not None:
            self._s3.release(self._intent)
            self._intent = None


class ShareStaging(FsspecStaging):
    """Several ranks' shares in one staging prefix; its commit copies them (server-side) into
    the step folder under the step's intent, then creates the marker conditionally."""

    def commit(
        self, final: str, marker_name: str, marker: bytes, files: Sequence[str] | None = None,
        fence: Callable[[], None] | None = None,
    ) -> bool:
        b: S3Backend = self._b  # type: ignore[assignment]
        with b.intent(final, give_up=lambda: b._marked(final)) as held:
            if held is None or b._marked(final):
                return False  # another writer committed this step: its files stay untouched
            if fence is not None:
                fence()  # refuse before copying anything
            b.remove_tree(final)  # a dead writer's partial step: nobody else writes here now
            for i, rel in enumerate(self._files if files is None else files):
                b.fs.copy(b.p(f"{self.path}/{rel}"), b.p(f"{final}/{rel}"))
                if i == 0:
                    faults.point("mid-copy")
            won = b.publish(held, final, marker_name, marker, fence)
        self.discard()
        return won
