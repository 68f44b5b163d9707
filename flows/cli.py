"""Command line of `python -m flows.train` (DESIGN.md section 3).

Validates everything it can *before* any server or cluster starts: bad input exits 2 with one
line and touches nothing. Exit status: 0 completed (or stopped as asked), 1 failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import time
from datetime import timedelta
from typing import Any, NoReturn

from pydantic import ValidationError
from rich.console import Console

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

OPTION_HELP = {
    "run_id": "run name; re-running with the same id resumes from the newest verified "
              "checkpoint (default: <model>-seed<seed>)",
    "fresh": "start the run over (otherwise an existing run is resumed, never overwritten)",
    "store": "checkpoint store: a local path or an fsspec URL (default ./runs)",
    "data": "text file or folder, or a folder with nanoGPT train.bin/val.bin "
            "(default: the Python standard library's source)",
    "model": "model size preset: tiny (tests) or small (default)",
    "steps": "total optimizer steps; fixes the LR schedule (default: the preset's)",
    "seed": "seed of initialisation, data order and per-step randomness (default 1337)",
    "until": "stop cleanly once the checkpoint at STEP is committed (status stopped; resumable)",
    "time_budget": "stop cleanly at the next checkpoint after DUR, e.g. 90s, 15m, 2h",
    "epoch_steps": "steps per epoch: evaluation and kept checkpoints at each end "
                   "(default: the preset's)",
    "group_steps": "optimizer steps per batch-group task (default 50)",
    "ckpt_every": "checkpoint interval in steps, or auto = Young/Daly from measured cost and "
                  "--mtbf (default: at each group's end)",
    "mtbf": "mean time between failures assumed by --ckpt-every auto (default 1h; refused "
            "without it)",
    "keep": "retention: keep the newest K checkpoints plus epoch ends (default 3)",
    "async_save": "on (the flag alone): checkpoints stop training only for a snapshot of the "
                  "state; hashing, writing and the commit run in the background, one at a time "
                  "(epoch ends, data-parallel group ends and the run's last checkpoint commit "
                  "in line); off: in line; auto (default): on where a GPU trains, off on CPU "
                  "workers, whose cores all train (a background save slows their steps more "
                  "than an in-line save stalls them). With --replicas, the replica that writes "
                  "saves in the background and the others go on training",
    "incremental_saves": "a checkpoint chunk equal to the previous checkpoint's is linked "
                         "(local disk) or copied server-side, not written again: frozen layers "
                         "cost nothing. One file is shared by at most --keep minus 1 checkpoints "
                         "(at least 2), so bit rot in one file always leaves a kept checkpoint "
                         "whole",
    "workers": "data-parallel ranks training one model together, one Dask worker each "
               "(default 1); must divide the preset's batch. A run keeps its N: resuming with "
               "another is refused unless --reshard",
    "collective_timeout": "bound on a rank's rendezvous and on every collective; a rank silent "
                          "this long is replaced (default 30s; needs --workers >= 2)",
    "reshard": "resume a run made with another --workers (continues from its checkpoint; not "
               "bit-exact with either N, said in the summary)",
    "spares": "spare Dask workers that absorb lost ones (default 1); with --cluster, the "
              "scheduler must have 1 + K workers (waits up to --cluster-timeout, else exit 2)",
    "standby": "hot (default): spares start with the cluster, warm; cold: no spare process "
               "runs until a failure is detected, then the cluster is asked for a new worker "
               "(paying its start-up). Local cluster only: refused with --cluster",
    "max_failures_per_worker": "a worker on which batch groups failed F times is unhealthy: "
                               "quarantined (never used again in this run) and replaced "
                               "(default 3)",
    "lease_ttl": "the coordinator's lease on the run (default 30s): a second coordinator exits "
                 "2 while it is live; a coordinator that cannot renew it stops, and its "
                 "workers' commits are refused",
    "vote_every": "with --replica-policy vote: also compare the replicas' state hashes every K "
                  "steps inside a group (default: at checkpoints and group ends)",
    "cluster": "address of an existing Dask scheduler, e.g. tcp://127.0.0.1:8786; its workers "
               "train and stand by (nothing is started)",
    "device": "auto (CUDA when present, else CPU), cpu or cuda",
    "threads": "torch threads per worker (default: cores / workers)",
    "replicas": "replica groups, each a full set of N (--workers) ranks training the same data "
                "on the same state in lockstep (default 1); workers used: N x R + spares",
    "replica_policy": "first (default): a group's result comes from the first replica group to "
                      "finish it; vote: replicas compare state hashes at checkpoints, group ends "
                      "and every --vote-every steps (a mismatch is silent data corruption)",
    "retries": "retries of a failed batch group before its epoch fails (default 2)",
    "hang_timeout": "a batch group that reports no progress for DUR is hung: its worker is "
                    "restarted and the group rerun (default 5m)",
    "cluster_timeout": "fail the run (exit 1) when the Dask scheduler is unreachable for DUR "
                       "(default 30s)",
    "no_worker_timeout": "fail the run (exit 1) when no Dask worker is left for DUR (default 60s)",
    "chaos": "inject failures, e.g. kill-worker@120,raise@300,corrupt-latest@200 or random:0.05",
    "summary_json": "write the run summary (JSON) here when the run ends, also when it fails",
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"error: {message} (see --help)\n")
        raise SystemExit(EXIT_USAGE)


def _int_or_auto(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number of steps nor auto") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m flows.train",
                description="Fault-tolerant training: Prefect batch-group tasks on a Dask cluster, "
                            "verified Zarr checkpoints, automatic resume.")
    h = OPTION_HELP
    p.add_argument("--run-id", help=h["run_id"])
    p.add_argument("--fresh", action="store_true", help=h["fresh"])
    p.add_argument("--store", default="./runs", help=h["store"])
    p.add_argument("--data", help=h["data"])
    p.add_argument("--model", default="small", help=h["model"])
    p.add_argument("--steps", type=int, help=h["steps"])
    p.add_argument("--seed", type=int, default=1337, help=h["seed"])
    p.add_argument("--until", type=int, metavar="STEP", help=h["until"])
    p.add_argument("--time-budget", metavar="DUR", help=h["time_budget"])
    p.add_argument("--epoch-steps", type=int, metavar="N", help=h["epoch_steps"])
    p.add_argument("--group-steps", type=int, metavar="G", help=h["group_steps"])
    p.add_argument("--ckpt-every", type=_int_or_auto, metavar="N|auto", help=h["ckpt_every"])
    p.add_argument("--mtbf", metavar="DUR", help=h["mtbf"])
    p.add_argument("--keep", type=int, default=3, metavar="K", help=h["keep"])
    p.add_argument("--workers", type=int, metavar="W", help=h["workers"])
    p.add_argument("--collective-timeout", metavar="DUR", help=h["collective_timeout"])
    p.add_argument("--reshard", action="store_true", default=None, help=h["reshard"])
    p.add_argument("--spares", type=int, metavar="K", help=h["spares"])
    p.add_argument("--standby", choices=("hot", "cold"), help=h["standby"])
    p.add_argument("--cluster", metavar="ADDRESS", help=h["cluster"])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help=h["device"])
    p.add_argument("--threads", type=int, help=h["threads"])
    p.add_argument("--replicas", type=int, metavar="R", help=h["replicas"])
    p.add_argument("--replica-policy", choices=("first", "vote"), help=h["replica_policy"])
    p.add_argument("--vote-every", type=int, metavar="K", help=h["vote_every"])
    p.add_argument("--max-failures-per-worker", type=int, metavar="F",
                   help=h["max_failures_per_worker"])
    p.add_argument("--lease-ttl", metavar="DUR", help=h["lease_ttl"])
    p.add_argument("--async-save", nargs="?", const="on", choices=("on", "off", "auto"),
                   help=h["async_save"])
    p.add_argument("--incremental-saves", action="store_true", default=None,
                   help=h["incremental_saves"])
    p.add_argument("--retries", type=int, default=2, help=h["retries"])
    p.add_argument("--hang-timeout", default="5m", metavar="DUR", help=h["hang_timeout"])
    p.add_argument("--cluster-timeout", default="30s", metavar="DUR", help=h["cluster_timeout"])
    p.add_argument("--no-worker-timeout", default="60s", metavar="DUR",
                   help=h["no_worker_timeout"])
    p.add_argument("--chaos", metavar="SPEC", help=h["chaos"])
    p.add_argument("--summary-json", metavar="FILE", help=h["summary_json"])
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    return p


def _first_error(err: ValidationError) -> str:
    first = err.errors()[0]
    field = ".".join(str(x) for x in first.get("loc", ())).replace("_", "-")
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"--{field}: {msg}" if field and not msg.startswith("--") else msg


def parse_params(argv: list[str] | None) -> tuple[Any, argparse.Namespace]:
    """argv -> TrainParams; exits 2 with one line on bad usage."""
    from flows.params import TrainParams

    args = build_parser().parse_args(argv)
    # Flags not given stay out, so the parameters know which were asked for (model_fields_set):
    # a flag that does nothing in the chosen setup is refused rather than silently ignored.
    fields = {k: v for k, v in vars(args).items() if k != "no_progress" and v is not None}
    if "async_save" in fields:
        fields["async_save"] = {"on": True, "off": False}.get(fields["async_save"], "auto")
    try:
        return TrainParams(**fields), args
    except ValidationError as err:
        sys.stderr.write(f"error: {_first_error(err)}\n")
        raise SystemExit(EXIT_USAGE) from None


def main(argv: list[str] | None = None, local_api: Any = None,
         started: float | None = None, server: Any = None, kept_cluster: Any = None) -> int:
    """Run the CLI; returns the exit status. ``local_api``: what
    flows.prefect_env.prepare_environment returned. ``started``: when the command began
    (default: now), so that the summary's start-up counts the imports before this call.
    ``server``: that API, already starting in the background
    (flows.prefect_env.ServerInBackground; default: started here once the run may go ahead);
    a server of the run's own is stopped before this returns, a kept one is left running.
    ``kept_cluster``: the local Dask cluster kept between runs that this run trains on
    (flows.kept_cluster.claim_for_run; default: a cluster of the run's own)."""
    started = time.time() if started is None else started
    from flows.prefect_env import ServerInBackground

    server = server or ServerInBackground(local_api)
    with server:
        return _main(argv, server, started, kept_cluster)


def _main(argv: list[str] | None, server: Any, started: float, kept_cluster: Any) -> int:
    params, args = parse_params(argv)
    from flows.plan import ConfigurationError, build_plan, check_store

    try:
        plan = build_plan(params, hand_over=True)
        check_store(plan, params)
    except ConfigurationError as err:
        sys.stderr.write(f"error: {err}\n")
        return EXIT_USAGE
    if params.cluster_workers_needed is not None:
        from flows.cluster import count_workers

        # Workers join a cluster over time: wait for them as long as a run waits for a lost
        # one, then fail (exit 1: the input is fine, the cluster is short).
        need = params.cluster_workers_needed
        have = count_workers(params.cluster, need, params.watchdog.no_worker_timeout)
        if have is not None and have < need:
            sys.stderr.write(
                f"error: --cluster {params.cluster} has {have} worker(s) after "
                f"{params.no_worker_timeout}; --workers {params.workers} --spares "
                f"{params.spares} needs {need}\n")
            return EXIT_FAILED
    from flows.lease_keeper import LeaseHeld, LeaseKeeper
    from storage import StoreError, open_store

    # One coordinator at a time (DESIGN.md section 8): the lease is taken before the cluster
    # starts or the store is written, and a live one held by another coordinator is refused
    # with nothing touched (the Prefect server, started early in case the run goes ahead,
    # stops with the CLI).
    try:
        keeper = LeaseKeeper(open_store(params.store), plan.run.run_id,
                             timedelta(seconds=params.lease_ttl_s))
    except LeaseHeld as err:
        sys.stderr.write(f"error: {err}\n")
        return EXIT_USAGE
    except StoreError as err:  # the store refuses the lease's few bytes: nothing can run
        sys.stderr.write(f"error: run {plan.run.run_id} failed: {err}\n")
        return EXIT_FAILED
    with keeper:  # released (expired now) on the way out, unless it was lost
        return _run(params, plan, server, started, kept_cluster,
                    show_progress=not args.no_progress)


def _run(params: Any, plan: Any, server: Any, started: float, kept_cluster: Any,
         show_progress: bool) -> int:
    from flows.cluster import CLUSTER_LISTENERS, MANAGERS, cuda_available, local_cluster
    from flows.plan import ConfigurationError
    from flows.prefect_env import rebound_home
    from flows.progress_view import ProgressView
    from flows.redundancy import local_cluster_size
    from flows.report import (
        RunTally,
        build_summary,
        print_summary,
        restamp_wall,
        write_summary_json,
    )
    from flows.train import RunFailed, console, train

    # Dask logs each worker's start and stop at INFO; the flow reports what matters. The
    # environment variable reaches the worker processes, which configure logging on import.
    os.environ.setdefault("DASK_LOGGING__DISTRIBUTED", "warning")
    logging.getLogger("distributed").setLevel(logging.WARNING)
    from flows.supervise import drop_cancelled_reconnects

    logging.getLogger("distributed.client").addFilter(drop_cancelled_reconnects)
    use_gpu = params.device == "cuda" or (params.device == "auto" and cuda_available())
    summary: dict[str, Any] | None = None
    returned: float | None = None  # when the flow returned or raised: after it, no start-up
    status, reason = EXIT_OK, None
    try:
        with contextlib.ExitStack() as stack:
            # The Prefect server and the cluster start side by side: both take seconds.
            server_ready = stack.enter_context(server)
            address = params.cluster
            if address is None and kept_cluster is not None:
                from flows.kept_cluster import KeptClusterManager

                # A kept cluster that failed to start costs its start-up, never the run.
                address = kept_cluster.wait_address()
                if address is None:
                    sys.stderr.write(kept_cluster.failed_note() + "\n")
                else:
                    MANAGERS[address] = KeptClusterManager(address, kept_cluster.pid)
                    stack.callback(MANAGERS.pop, address, None)
            if address is None:
                cluster = stack.enter_context(
                    local_cluster(local_cluster_size(params), rebound_home() / "dask", use_gpu,
                                  boot_low=params.standby == "hot"))
                address = cluster.scheduler_address
            view = stack.enter_context(ProgressView(
                console, plan.run.run_id, plan.stop_at, 0,
                enabled=show_progress and sys.stderr.isatty()))
            view.attach(address)
            CLUSTER_LISTENERS.append(view.attach)
            stack.callback(CLUSTER_LISTENERS.remove, view.attach)
            server_ready()
            # The flow gets the cluster's address; its parameters were validated above, with the
            # flags the user gave: validated again as a whole, a cluster the CLI started itself
            # would read as a user's --cluster (refused with --standby cold).
            try:
                summary = train.with_options(validate_parameters=False)(
                    params.model_copy(update={"cluster": address}))
            finally:
                returned = time.time()
    except KeyboardInterrupt:
        status, reason = EXIT_FAILED, "interrupted"
    except RunFailed as failed:
        status, reason, summary = EXIT_FAILED, str(failed), failed.summary
    except ConfigurationError as err:
        status, reason = EXIT_USAGE, str(err)
    except Exception as err:  # noqa: BLE001 - every failure ends in a summary and exit 1
        first_line = str(err).splitlines()[0] if str(err) else ""
        status, reason = EXIT_FAILED, f"{type(err).__name__}: {first_line}"
    if status != EXIT_OK:
        sys.stderr.write(f"error: run {plan.run.run_id} failed: {reason}\n")
    if summary is None:
        tally = RunTally(plan.run.run_id, params.store, started)
        summary = build_summary(tally, "failed", reason, time.time() - started)
    else:
        # The server and cluster start-up count; closing them after the flow is orchestration.
        now = time.time()
        restamp_wall(summary, now - started, now - returned if returned else 0.0)
    print_summary(Console(), summary)
    _say_kept_api(getattr(server, "api", None))
    if kept_cluster is not None and kept_cluster.started_here and kept_cluster.alive():
        from flows.kept_cluster import describe

        sys.stderr.write(describe(kept_cluster) + "\n")
    if params.summary_json:
        write_summary_json(summary, params.summary_json)
    return status


def _say_kept_api(api: Any) -> None:
    """Tell the user once, when it started, that the API outlives the run, and how not to."""
    if api is None or not api.kept or not api.started_here:
        return
    idle = f"{api.idle_s / 60:g} min" if api.idle_s >= 60 else f"{api.idle_s:g} s"
    sys.stderr.write(f"note: the Prefect API at {api.url} (pid {api.pid}) stays up for later "
                     f"runs until {idle} pass without one (REBOUND_API_IDLE; 0: stop it with "
                     "each run)\n")
