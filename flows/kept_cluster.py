"""One local Dask cluster kept between the runs of a REBOUND_HOME, as the Prefect API is.

From the command to the first step a local run spends ~7-9 s here, and most of it is the
workers' forkserver importing torch, torch._dynamo and Prefect (8 CPU-s) and the coordinator's
own imports, side by side on 2 cores. Workers that exist before the command remove the first:
the first run starts `python -m flows.cluster_server` detached (its own session, 127.0.0.1
only), which holds a LocalCluster of the run's size, and records it in REBOUND_HOME/cluster.json;
later runs of the same shape use it as they would a --cluster, and it exits by itself after
REBOUND_CLUSTER_IDLE (default 10m) without a run. REBOUND_CLUSTER_IDLE=0 turns it off.

Reuse is safe because:
- a run uses only a cluster started for the same key: the worker count, the GPU choice, the
  interpreter, the versions of Rebound's dependencies, our own source files (size and mtime)
  and the whole environment the workers inherit (Prefect's API URL included) and working
  directory. A workers' process imported our code once: an edited file must never train with
  the old one. Any other run starts a cluster that takes over the record; the old one, with
  nobody using it, leaves after its idle window;
- what a worker keeps from one run to the next is keyed by run and config (tasks/worker_cache)
  and a resumed run may only continue from a trainer whose memory equals the checkpoint it
  starts from, as on any --cluster;
- each cluster has its own users file, on which every run that uses it holds a shared flock from
  before it looks until it exits (SIGKILL included); the server leaves only while it holds the
  exclusive lock, so it never goes away under a run, nor between a run's look and its use;
- discovery and start-up are serialised by REBOUND_HOME/cluster.lock: two runs at once start one;
- one run at a time trains on it (an exclusive flock on its busy file, held until the run
  exits): a run that finds it busy starts a cluster of its own, as with REBOUND_CLUSTER_IDLE=0,
  so that two runs never share, or warm spares on, each other's workers.

Only hot standby keeps its cluster: cold standby starts a worker per failure from a cluster of
the run's own. The kept cluster's manager lives in its process: the run asks it for
replacements through its scheduler (KeptClusterManager).

This module imports neither Dask nor torch: the CLI claims the cluster before its imports, so
that a run which reuses one never starts a forkserver of its own.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.kept_api import idle_s_from_env, pid_alive, read_live_record, stopped, terminate

IDLE_ENV = "REBOUND_CLUSTER_IDLE"
DEFAULT_IDLE_S = 600.0
RECORD, START_LOCK, LOG = "cluster.json", "cluster.lock", "cluster.log"
START_TIMEOUT_S = 180.0
"""The first run waits this long for the server's workers (a LocalCluster allows 120 s)."""
PUT_DOWN_TIMEOUT_S = 10.0
"""How long a run waits for a server it SIGKILLed to be gone."""
ANSWER_TIMEOUT_S = 10.0
"""How long a run waits for a kept cluster it found to answer before it puts it down: an idle
scheduler answers in milliseconds, and Dask itself calls an event loop blocked at 3 s."""

ROOT = Path(__file__).resolve().parents[1]
OUR_PACKAGES = ("flows", "tasks", "training", "storage")
DEPENDENCIES = ("torch", "dask", "distributed", "prefect", "zarr", "numpy", "xxhash")
VOLATILE_ENV = frozenset({"PWD", "OLDPWD", "SHLVL", "_", "TERM", "COLUMNS", "LINES",
                          "TERM_PROGRAM", "TERM_PROGRAM_VERSION", "SSH_TTY", "SSH_CONNECTION",
                          "SSH_CLIENT", "DISPLAY", "WINDOWID", "REBOUND_API_IDLE",
                          "REBOUND_CLUSTER_IDLE", "REBOUND_COORDINATOR_IDLE"})
"""Environment variables a worker never reads: they differ from one shell to the next, or say
only how long the coordinator's servers stay."""

_USERS_FD: list[int] = []
"""This process's shared lock on its cluster's users file, held until it exits."""
_BUSY_FD: list[int] = []
"""This process's exclusive lock on its cluster's busy file: one run trains on it at a time."""


def idle_s() -> float:
    """REBOUND_CLUSTER_IDLE in seconds (BadIdleSetting when it is not a duration)."""
    return idle_s_from_env(IDLE_ENV, DEFAULT_IDLE_S)


def cluster_key(n_workers: int, use_gpu: bool) -> str:
    """What a kept cluster's workers were started with that a run relies on."""
    payload = {"workers": n_workers, "gpu": use_gpu, **code_and_environment()}
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:32]


def code_and_environment() -> dict[str, Any]:
    """What a process kept between runs imported our code under: the interpreter, the working
    directory, the dependencies' versions, our source files (size, mtime) and the environment
    (but VOLATILE_ENV)."""
    code = []
    for package in OUR_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            st = path.stat()
            code.append((str(path.relative_to(ROOT)), st.st_size, st.st_mtime_ns))
    versions = {}
    for name in DEPENDENCIES:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            versions[name] = importlib.metadata.version(name)
    return {"python": sys.executable, "cwd": os.getcwd(), "versions": sorted(versions.items()),
            "code": code,
            "env": sorted((k, v) for k, v in os.environ.items() if k not in VOLATILE_ENV)}


def read_record(home: Path) -> dict | None:
    """The kept cluster's record in REBOUND_HOME when it names a live server of ours."""
    return read_live_record(home / RECORD, "flows.cluster_server",
                            lambda record: str(record["key"]))


@dataclass
class KeptCluster:
    """The kept cluster a run uses: found running, or being started by this run."""

    home: Path
    key: str
    idle_s: float
    started_here: bool
    address: str | None = None
    pid: int | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)
    wedged: bool = False
    """Found running, its scheduler answered nothing within ANSWER_TIMEOUT_S: put down."""

    def wait_address(self) -> str | None:
        """The scheduler's address; for a cluster this run started, once its workers are up;
        for one it found, once its scheduler answers. None when it did not start (it exited,
        was killed, or hung past START_TIMEOUT_S: then it is stopped here by its PID) or, found
        running, did not answer within ANSWER_TIMEOUT_S (its process lives but serves nobody:
        it is put down by its PID, and the next run starts a new one); the run then starts a
        cluster of its own."""
        if self.address is not None and not self.started_here:
            if scheduler_answers(self.address, ANSWER_TIMEOUT_S):
                return self.address
            assert self.pid is not None
            KeptClusterManager(self.address, self.pid).put_down("answered nothing")
            self.wedged, self.address = True, None
            return None
        if self.address is not None:
            return self.address
        process = self.process
        assert process is not None and process.stdout is not None
        try:
            line = _read_line(process, START_TIMEOUT_S)
        finally:
            process.stdout.close()
        if not line.startswith("tcp://"):
            if process.poll() is None:
                terminate(process.pid, 10.0)
            process.wait()
            return None
        self.address = line
        return line

    def alive(self) -> bool:
        """Whether its server is up and serving (it may have died under the run)."""
        return self.address is not None and self.pid is not None and pid_alive(self.pid)

    def failed_note(self) -> str:
        """The one line a run says when the kept cluster it started did not start, or the one
        it found did not answer."""
        if self.wedged:
            return (f"note: the Dask cluster kept between runs (pid {self.pid}) answered nothing "
                    f"for {ANSWER_TIMEOUT_S:g} s and is put down; this run starts a cluster of "
                    "its own")
        return (f"note: the Dask cluster kept between runs did not start (see "
                f"{self.home / LOG}); this run starts a cluster of its own")


def scheduler_answers(address: str, timeout_s: float) -> bool:
    """Whether the Dask scheduler at `address` answers an identity call within timeout_s. A
    process that lives but whose event loop is blocked still accepts the TCP connection (the
    kernel does), so only a round trip in Dask's protocol tells."""
    import asyncio

    from distributed.core import rpc

    async def ask() -> None:
        async with rpc(address, timeout=timeout_s) as scheduler:
            await scheduler.identity()

    try:
        asyncio.run(asyncio.wait_for(ask(), timeout_s))
    except Exception:  # noqa: BLE001 - refused, reset, timed out: it does not answer
        return False
    return True


def _read_line(process: subprocess.Popen, timeout_s: float) -> str:
    """The server's first line (its address), or '' when it exited or timed out first."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as sel:
        sel.register(process.stdout, selectors.EVENT_READ)
        if not sel.select(timeout_s):
            return ""
    return process.stdout.readline().decode(errors="replace").strip()


def _hold_users(home: Path, key: str) -> None:
    """Hold this process's use of the cluster with `key` until it exits (one per process)."""
    if _USERS_FD:
        return
    fd = os.open(users_file(home, key), os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_SH)  # waits out a server that is leaving
    _USERS_FD.append(fd)


def users_file(home: Path, key: str) -> Path:
    return home / f"cluster-{key[:16]}.users"


def _take_busy(home: Path, key: str) -> bool:
    """Take the cluster with `key` for this process until it exits; False when another run
    trains on it now (two runs on one cluster would share, and warm, each other's workers)."""
    if _BUSY_FD:
        return True
    fd = os.open(home / f"cluster-{key[:16]}.busy", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return False
    _BUSY_FD.append(fd)
    return True


def claim(home: Path, n_workers: int, use_gpu: bool, idle: float) -> KeptCluster | None:
    """This run's kept cluster of `n_workers` workers: the one running for this key, or one this
    process starts now (its workers come up while the run goes on with its imports;
    `wait_address` waits for them). Holds this process's use of it until exit. None when
    another run trains on it now: this run starts a cluster of its own."""
    home.mkdir(parents=True, exist_ok=True)
    key = cluster_key(n_workers, use_gpu)
    if not _take_busy(home, key):
        return None
    _hold_users(home, key)
    lock_fd = os.open(home / START_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        record = read_record(home)
        if record is not None and stopped(int(record["pid"])):
            # Stopped by a signal, it would hang this run at its first call: a cluster that
            # serves nobody is put down, and this run starts the one that takes its record.
            KeptClusterManager(str(record["address"]), int(record["pid"])).put_down("stopped")
            record = None
        if record is not None and record.get("key") == key:
            return KeptCluster(home, key, float(record["idle_s"]), started_here=False,
                               address=str(record["address"]), pid=int(record["pid"]))
        # The server inherits the start lock and lets it go once it has written its record:
        # other runs wait for it, and a run that ends first (refused, killed) loses nothing.
        process = _spawn(home, key, n_workers, use_gpu, idle, lock_fd)
    finally:
        os.close(lock_fd)
    return KeptCluster(home, key, idle, started_here=True, pid=process.pid, process=process)


def _spawn(home: Path, key: str, n_workers: int, use_gpu: bool, idle: float,
           lock_fd: int) -> subprocess.Popen:
    log = open(home / LOG, "ab")  # noqa: SIM115 - the child holds it; ours closes below
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "flows.cluster_server", "--workers", str(n_workers),
             "--gpu", str(int(use_gpu)), "--dir", str(home / "dask"), "--idle-s", str(idle),
             "--users", str(users_file(home, key)), "--record", str(home / RECORD),
             "--key", key, "--lock-fd", str(lock_fd)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log, pass_fds=(lock_fd,),
            start_new_session=True,  # not in the run's process group: it outlives the run
            cwd=os.getcwd())
    finally:
        log.close()


class KeptClusterManager:
    """MANAGERS' entry for a kept cluster: its LocalCluster lives in the server's process, the
    same process as its scheduler, so the run reaches it through the scheduler."""

    def __init__(self, address: str, pid: int | None = None) -> None:
        self.address = address
        self.pid = pid
        self._put_down: str | None = None

    def lost(self) -> str | None:
        """One line when the server holding the cluster is gone for this run (flows.cluster.
        cluster_gone): it died, and its scheduler and workers went with it; or it was stopped
        by a signal, and is put down here; or the run put it down (put_down)."""
        if self.pid is None:
            return None
        why = self._put_down
        if why is None and pid_alive(self.pid):
            if not stopped(self.pid):
                return None
            why = self.put_down("was stopped by a signal and is put down")
        return (f"the Dask cluster kept between runs ({self.address}, pid {self.pid}) "
                f"{why or 'was lost'} (cluster lost)")

    def put_down(self, why: str) -> str:
        """SIGKILL the server, which can serve this run no more (stopped, or its scheduler does
        not answer), by its PID, and wait for it to go: its workers' nannies live in it, so
        they go too (none goes on training beside the run's new cluster), and no later run
        finds it. `why` is what lost() says from now on; returned."""
        assert self.pid is not None
        self._put_down = why
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)  # a stopped process dies of it too
        deadline = time.monotonic() + PUT_DOWN_TIMEOUT_S
        while pid_alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)  # polling: the server is not always this process's child
        return why

    def replace_worker(self, drop: str | None, target: int, fresh: str,
                       say: Callable[[str], None] = print) -> None:
        """flows.cluster.rescale in the server's process; returns at once (the caller is the
        scheduler's event thread, and the new worker's join is an event of its own). A
        request that cannot be sent is said in one line."""
        threading.Thread(target=self.rescale, args=(drop, target, fresh, say), daemon=True,
                         name="kept-cluster-rescale").start()

    def rescale(self, drop: str | None, target: int, fresh: str,
                say: Callable[[str], None] = print) -> None:
        """What replace_worker does, in the caller's thread."""
        from distributed import Client

        from flows.cluster_server import rescale_kept

        try:
            with Client(self.address, timeout=30, set_as_default=False) as client:
                client.run_on_scheduler(rescale_kept, drop, target, fresh)
        except Exception as err:  # noqa: BLE001 - one line; a lost scheduler fails the run
            say(f"could not ask the kept cluster for a worker: {type(err).__name__}: {err}")


def stop_kept_cluster(home: Path, timeout_s: float = 60.0) -> int | None:
    """SIGTERM the kept cluster of `home` (REBOUND_HOME) by its PID and wait for it to close
    its workers and exit; its PID, or None when none runs. For benches and tests."""
    record = read_record(home)
    return None if record is None else terminate(int(record["pid"]), timeout_s)


def describe(kept: Any) -> str:
    """The one line a run that started the kept cluster prints after its summary."""
    idle = f"{kept.idle_s / 60:g} min" if kept.idle_s >= 60 else f"{kept.idle_s:g} s"
    return (f"note: the Dask cluster at {kept.address} (pid {kept.pid}) stays up for later "
            f"runs like this one until {idle} pass without one ({IDLE_ENV}; 0: stop it with "
            "each run)")


def claim_for_run(params: Any, local_api: Any) -> KeptCluster | None:
    """The kept cluster a CLI run trains on, claimed (and if need be started) right after its
    flags are parsed; None when this run starts a cluster of its own (or trains on --cluster).
    A bad REBOUND_CLUSTER_IDLE exits 2 with one line, before anything starts."""
    from flows.kept_api import BadIdleSetting

    try:
        idle = idle_s()
    except BadIdleSetting as err:
        sys.stderr.write(f"error: {err}\n")
        raise SystemExit(2) from None
    if idle <= 0 or params.cluster is not None or params.standby != "hot":
        return None
    if local_api is not None and not local_api.kept:
        return None  # the run's own API stops with it: kept workers would report to nothing
    from flows.gpu_probe import cuda_available
    from flows.prefect_env import rebound_home

    use_gpu = params.device == "cuda" or (params.device == "auto" and cuda_available())
    # flows.redundancy.local_cluster_size for hot standby, without importing Dask here.
    kept = claim(rebound_home(), params.ranks_total + params.spares, use_gpu, idle)
    if kept is None:
        sys.stderr.write("note: another run trains on the Dask cluster kept in "
                         f"{rebound_home()}; this run starts a cluster of its own\n")
    return kept
