"""The train flow's parameters: one pydantic model, so the Prefect UI renders it as a form."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from flows.supervise import Watchdog

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


def parse_duration_s(text: str) -> float:
    """'90', '90s', '15m', '2h', '1d' -> seconds; ValueError naming the text otherwise."""
    match = _DURATION.match(text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a duration such as 90s, 15m or 2h")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


class TrainParams(BaseModel):
    """Everything one training run needs; every CLI option of `python -m flows.train`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    run_id: str | None = Field(None, description="Run name; the same id resumes. Default: <model>-seed<seed>.")
    fresh: bool = Field(False, description="Start the run over instead of resuming it.")
    store: str = Field("./runs", description="Checkpoint store: a local path or an fsspec URL.")
    data: str | None = Field(None, description="Text file or folder; default: the Python stdlib source.")
    model: str = Field("small", description="Model preset: tiny (tests) or small (default).")
    steps: int | None = Field(None, ge=1, description="Total optimizer steps (fixes the LR schedule).")
    seed: int = Field(1337, ge=0, description="Seed of initialisation, data order and per-step randomness.")
    until: int | None = Field(None, ge=1, description="Stop cleanly once the checkpoint at this step is committed.")
    time_budget: str | None = Field(None, description="Stop cleanly at the next checkpoint after this long (e.g. 2h).")
    epoch_steps: int | None = Field(None, ge=1, description="Steps per epoch (evaluation, retained checkpoints); default: the preset's.")
    group_steps: int | None = Field(None, ge=1, description="Optimizer steps per batch-group task.")
    ckpt_every: int | Literal["auto"] | None = Field(None, description="Checkpoint interval in steps, or auto (Young/Daly).")
    mtbf: str = Field("1h", description="Mean time between failures assumed by --ckpt-every auto.")
    keep: int = Field(3, ge=1, description="Keep the newest K checkpoints (plus epoch ends).")
    workers: int = Field(1, ge=1, le=256, description="Data-parallel ranks training one model together (each a Dask worker); must divide the batch.")
    collective_timeout: str = Field("30s", description="Bound on a rank's rendezvous and every collective; a rank silent this long is lost.")
    reshard: bool = Field(False, description="Resume a run made with another --workers (not bit-exact; said in the summary).")
    spares: int = Field(1, ge=0, le=64, description="Spare Dask workers that absorb lost ones (on --cluster: checked to be there).")
    standby: Literal["hot", "cold"] = Field("hot", description="hot: spares run warm from the start; cold: no spare process runs until a failure, then the cluster is asked for a new worker.")
    max_failures_per_worker: int = Field(3, ge=1, le=1000, description="A worker on which batch groups failed this many times is unhealthy: quarantined and replaced.")
    lease_ttl: str = Field("30s", description="The coordinator's lease on the run: renewed every third of this; a coordinator silent this long loses the run.")
    cluster: str | None = Field(None, description="Address of an existing Dask scheduler (tcp://host:port).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train.")
    threads: int | None = Field(None, ge=1, le=256, description="Torch threads per worker (default: cores / workers).")
    replicas: int = Field(1, ge=1, le=16, description="Replica groups, each --workers ranks on the same data and state (workers used: workers x replicas + spares).")
    replica_policy: Literal["first", "vote"] = Field("first", description="first: the first replica group to finish a group wins; vote: replicas compare state hashes (silent data corruption).")
    vote_every: int | None = Field(None, ge=1, description="With --replica-policy vote: also vote every K steps inside a group (default: at checkpoints and group ends).")
    async_save: bool | Literal["auto"] = Field("auto", description="true: checkpoints stop training only for a snapshot; hashing, writing and the commit run in the background (one save in flight; epoch ends, group ends of data-parallel ranks and the run's last checkpoint commit in line). false: in line. auto: in the background where a GPU trains (the CPU cores are free to hash and write), in line on CPU workers, whose cores all train.")
    incremental_saves: bool = Field(False, description="A checkpoint chunk equal to the previous checkpoint's is hard-linked (local) or copied server-side, not written again: frozen layers cost nothing. One file is shared by at most keep - 1 checkpoints (at least 2), so bit rot in one file always leaves a kept checkpoint whole.")
    retries: int = Field(2, ge=0, le=20, description="Retries of a failed batch group.")
    hang_timeout: str = Field("5m", description="A batch group silent this long is hung: its worker is restarted.")
    cluster_timeout: str = Field("30s", description="Scheduler unreachable this long: the run fails (exit 1).")
    no_worker_timeout: str = Field("60s", description="No Dask worker at all this long: the run fails (exit 1).")
    chaos: str | None = Field(None, description="Failures to inject, e.g. kill-worker@120,raise@300.")
    summary_json: str | None = Field(None, description="Write the run summary here when the run ends.")
    # Not a CLI option: prefect.yaml's heal trigger sets it. The cap is in the parameter schema,
    # so the server refuses to create a fourth automatic rerun (deployments/self-healing.md).
    heal_attempt: int = Field(0, ge=0, le=3, description="Automatic rerun of a crashed deployment run this is (0: started by hand; at most 3).")

    @field_validator("run_id")
    @classmethod
    def _run_id_is_a_name(cls, value: str | None) -> str | None:
        if value is not None and not _RUN_ID.match(value):
            raise ValueError(f"--run-id {value!r}: use letters, digits, '.', '_' and '-' (max 128)")
        return value

    @field_validator("time_budget", "mtbf", "hang_timeout", "cluster_timeout", "no_worker_timeout",
                     "collective_timeout", "lease_ttl")
    @classmethod
    def _is_duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration_s(value)
        return value

    @field_validator("chaos")
    @classmethod
    def _chaos_parses(cls, value: str | None) -> str | None:
        from tasks.chaos import parse_chaos

        parse_chaos(value)
        return value

    @field_validator("ckpt_every")
    @classmethod
    def _ckpt_every_positive(cls, value: int | str | None) -> int | str | None:
        if isinstance(value, int) and value < 1:
            raise ValueError("--ckpt-every must be >= 1 or auto")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> TrainParams:
        given = self.model_fields_set
        if "replica_policy" in given and self.replicas < 2:
            raise ValueError("--replica-policy needs --replicas >= 2")
        if "vote_every" in given and self.replica_policy != "vote":
            raise ValueError("--vote-every needs --replica-policy vote")
        if self.chaos and "perturb-replica" in self.chaos and self.workers < 2 and \
                self.replicas < 2:
            raise ValueError("--chaos perturb-replica needs --replicas >= 2 or --workers >= 2 "
                             "(someone to compare state hashes with)")
        if self.chaos and "kill-before-commit" in self.chaos and (
                self.workers < 2 or self.replicas > 1 or self.async_save is not True):
            raise ValueError("--chaos kill-before-commit needs --workers >= 2, one replica "
                             "group and --async-save on (it strikes rank 0 committing a "
                             "background checkpoint)")
        if self.chaos:
            from tasks.chaos import parse_chaos

            for event in parse_chaos(self.chaos).events:
                if event.rank >= self.workers or event.replica >= self.replicas:
                    raise ValueError(f"--chaos {event.kind}@{event.step}/{event.replica}."
                                     f"{event.rank}: there are {self.workers} ranks in "
                                     f"{self.replicas} replica group(s)")
        if "mtbf" in given and self.ckpt_every != "auto":
            raise ValueError("--mtbf is only used by --ckpt-every auto")
        if self.cluster and self.standby == "cold" and "standby" in given:
            raise ValueError("--standby cold applies to the local cluster: on --cluster the "
                             "scheduler's own workers are the spares")
        if "collective_timeout" in given and self.workers < 2 and self.replicas < 2:
            raise ValueError("--collective-timeout needs --workers >= 2 (a single rank has no "
                             "collectives)")
        if (self.workers >= 2 or self.replicas >= 2) and \
                parse_duration_s(self.collective_timeout) >= parse_duration_s(self.hang_timeout):
            raise ValueError(f"--collective-timeout {self.collective_timeout} must be shorter "
                             f"than --hang-timeout {self.hang_timeout}")
        if self.until is not None and self.steps is not None and self.until > self.steps:
            raise ValueError(f"--until {self.until} is past --steps {self.steps}")
        return self

    @property
    def cluster_workers_needed(self) -> int | None:
        """On --cluster with --workers/--spares given: how many workers the scheduler must have."""
        given = self.model_fields_set
        if self.cluster and {"workers", "spares"} & given:
            return self.workers * self.replicas + (self.spares if "spares" in given else 0)
        return None

    @property
    def resolved_run_id(self) -> str:
        return self.run_id or f"{self.model}-seed{self.seed}"

    @property
    def time_budget_s(self) -> float | None:
        return parse_duration_s(self.time_budget) if self.time_budget else None

    @property
    def collective_timeout_s(self) -> float:
        return parse_duration_s(self.collective_timeout)

    @property
    def lease_ttl_s(self) -> float:
        return parse_duration_s(self.lease_ttl)

    @property
    def ranks_total(self) -> int:
        """Workers that hold a rank: workers x replicas."""
        return self.workers * self.replicas

    @property
    def mtbf_s(self) -> float:
        return parse_duration_s(self.mtbf)

    @property
    def watchdog(self) -> Watchdog:
        from flows.supervise import Watchdog

        return Watchdog(hang_timeout=timedelta(seconds=parse_duration_s(self.hang_timeout)),
                        scheduler_timeout=timedelta(seconds=parse_duration_s(self.cluster_timeout)),
                        no_worker_timeout=timedelta(seconds=parse_duration_s(self.no_worker_timeout)))
