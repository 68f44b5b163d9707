"""Turn parameters into a run plan, and check it against what the store already holds.

Pure of Prefect and Dask so the CLI can validate (exit 2) before any server or cluster starts,
and the flow can run the same checks when started from a deployment.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from flows.params import TrainParams
from storage import open_store
from tasks.jobs import RunSpec
from training.config import TrainConfig
from training.data import Corpus, load_corpus, steps_per_epoch
from training.rendezvous import batch_share

DEFAULT_GROUP_STEPS = 50
"""Steps per batch-group task: seconds of work each, so ~0.3 s of Dask+Prefect overhead is small."""


class ConfigurationError(ValueError):
    """Bad input: fatal, exit 2, never retried, nothing in the store touched."""


@dataclass(frozen=True)
class Group:
    first_step: int
    last_step: int
    epoch: int
    epoch_end: bool


@dataclass
class RunPlan:
    run: RunSpec
    total_steps: int
    group_steps: int
    ckpt_every: int
    ckpt_auto: bool
    epoch_steps: int
    stop_at: int
    """Last step this invocation trains to (--until, else total_steps)."""
    corpus_description: str
    groups: list[Group] = field(default_factory=list)

    def groups_after(self, step: int) -> list[Group]:
        return [g for g in self.groups if g.last_step > step]


def _default_threads(params: TrainParams) -> int:
    return max(1, (os.cpu_count() or 1) // params.workers) if params.threads is None else params.threads


def make_groups(stop_at: int, total: int, group_steps: int, epoch_steps: int) -> list[Group]:
    """Groups of at most group_steps that never cross an epoch end, --until or the run's end."""
    groups: list[Group] = []
    step = 0
    while step < min(stop_at, total):
        epoch = step // epoch_steps
        epoch_end = min((epoch + 1) * epoch_steps, total)
        last = min(step + group_steps, epoch_end, stop_at)
        groups.append(Group(step, last, epoch, last == epoch_end))
        step = last
    return groups


def background_saves(params: TrainParams) -> bool:
    """Whether checkpoints inside groups are written in the background. `auto`: where a GPU
    trains, whose host cores are idle while it computes; not on CPU workers, whose cores all
    train: there a background save's hashing and writing slowed the steps it overlapped by
    ~0.3 s a save against an in-line save's 0.07 s stall (small preset, 2 cores, bench.goodput).
    With replica groups the writing replica saves behind its training; the others go on."""
    if isinstance(params.async_save, bool):
        return params.async_save
    if params.device == "cpu":
        return False
    from flows.cluster import cuda_available

    return params.device == "cuda" or cuda_available()


_HANDED_OVER: dict[str | None, Corpus] = {}
"""The corpus the CLI read for its plan, taken once by the flow's own plan in the same process:
reading and hashing the stdlib's source twice costs ~0.1 s of start-up."""


def build_plan(params: TrainParams, corpus: Corpus | None = None,
               hand_over: bool = False) -> RunPlan:
    """The run plan; ConfigurationError (one line) for anything wrong with the input.

    hand_over: keep the corpus for the next plan of the same data in this process (the CLI's
    plan, then the flow's), which takes it instead of reading the data again.
    """
    try:
        corpus = corpus or _HANDED_OVER.pop(params.data, None) or load_corpus(params.data)
        if hand_over:
            _HANDED_OVER[params.data] = corpus
        cfg = TrainConfig(model=params.model, steps=params.steps, seed=params.seed,
                          epoch_steps=params.epoch_steps,
                          device=params.device, torch_threads=_default_threads(params))
        resolved = cfg.resolved()
    except (ValueError, OSError) as err:
        raise ConfigurationError(str(err).splitlines()[0]) from None
    total = resolved.steps
    try:
        batch_share(resolved.batch_size, params.workers)
    except ValueError as err:
        raise ConfigurationError(f"--workers {params.workers}: {err}") from None
    if params.until is not None and params.until > total:
        raise ConfigurationError(f"--until {params.until} is past the run's {total} steps")
    group_steps = params.group_steps or min(DEFAULT_GROUP_STEPS, total)
    auto = params.ckpt_every == "auto"
    ckpt_every = group_steps if (auto or params.ckpt_every is None) else int(params.ckpt_every)
    epoch_steps = steps_per_epoch(corpus, resolved)
    run = RunSpec(
        run_id=params.resolved_run_id,
        store_url=params.store,
        train_config=cfg.to_dict(),
        data_path=None if params.data is None else os.path.abspath(params.data),
        config_hash=cfg.config_hash(corpus.fingerprint),
        chaos_spec=params.chaos or "",
        device=params.device,
        keep_last=params.keep,
        async_save=background_saves(params),
        incremental_saves=params.incremental_saves,
    )
    stop_at = min(params.until or total, total)
    plan = RunPlan(run, total, group_steps, ckpt_every, auto, epoch_steps, stop_at,
                   corpus.description)
    plan.groups = make_groups(stop_at, total, group_steps, epoch_steps)
    return plan


def run_record(plan: RunPlan, params: TrainParams) -> dict[str, Any]:
    """What the store keeps about a run, to refuse a resume under another configuration."""
    return {"run_id": plan.run.run_id, "config_hash": plan.run.config_hash,
            "model": params.model, "data": plan.run.data_path, "seed": params.seed,
            "steps": plan.total_steps, "threads": plan.run.train_config.get("torch_threads"),
            "workers": params.workers,
            "train_config": plan.run.train_config,
            "corpus": plan.corpus_description}


def check_store(plan: RunPlan, params: TrainParams) -> bool:
    """True when the run exists (and will be resumed); ConfigurationError when it cannot be."""
    try:
        store = open_store(params.store)
        existing = store.read_json(plan.run.run_id, "run")
    except (ValueError, OSError) as err:
        raise ConfigurationError(f"--store {params.store!r}: {err}") from None
    if existing is None or params.fresh:
        return existing is not None
    record = run_record(plan, params)
    # Threads are outside the config hash (they don't change the math's meaning) but they do
    # change float summation order, so a bit-exact resume needs the same number.
    threads_differ = existing.get("threads", record["threads"]) != record["threads"]
    if existing.get("config_hash") != plan.run.config_hash or \
            (threads_differ and not params.reshard):
        diffs = [k for k in ("model", "data", "seed", "steps", "threads")
                 if existing.get(k, record[k]) != record[k]]
        what = ", ".join(f"{k} {existing.get(k)!r}" for k in diffs) or "another configuration"
        raise ConfigurationError(
            f"run {plan.run.run_id!r} in {params.store} was made with {what}; "
            "pass the same options, another --run-id, or --fresh to start it over")
    # Gradient shares change float summation: the same N is needed for a bit-exact resume.
    made_with = int(existing.get("workers", 1))
    if made_with != params.workers and not params.reshard:
        raise ConfigurationError(
            f"run {plan.run.run_id!r} in {params.store} was trained with --workers {made_with}; "
            f"pass --workers {made_with}, or --reshard to continue it with {params.workers} "
            "(not bit-exact)")
    return True


@dataclass(frozen=True)
class PriceSample:
    """What one group's checkpoints cost: ``saves`` saves, their stall and drag seconds."""

    background: bool
    stall_s: float
    drag_s: float
    saves: int


def price_sample(result: Mapping[str, Any]) -> PriceSample | None:
    """What the group that returned ``result`` measured of a checkpoint's price, or None.

    A background save costs its stall plus its drag (how much slower it made the steps it
    overlapped); until a group has run steps beside a background save, its drag is unknown,
    not zero, and the group measured nothing. An in-line save costs its stall.
    """
    saves = int(result.get("background_saves", 0))
    if saves:
        if not int(result.get("background_overlap_steps", 0)):
            return None
        return PriceSample(True, float(result["background_stall_s"]),
                           float(result.get("background_drag_s", 0.0)), saves)
    checkpoints = len(result.get("checkpoints") or ())
    return PriceSample(False, float(result["ckpt_s"]), 0.0, checkpoints) if checkpoints else None


class CheckpointPrice:
    """The price of one more checkpoint, (stall, drag) seconds, from the newest groups.

    From the last ``window`` groups that measured one, not from every group so far: the price
    depends on the interval (saves due faster than they finish queue up, and the wait is
    stall), so an early group that ran at too short an interval must not keep the next ones
    there; and not from the newest alone, whose few saves' drag is noisy. Only samples of the
    newest one's kind count (an in-line save's stall says nothing of a background save's drag).
    """

    def __init__(self, window: int = 3) -> None:
        self._samples: deque[PriceSample] = deque(maxlen=window)

    def add(self, sample: PriceSample) -> tuple[float, float]:
        """Take one group's sample; the price per checkpoint now."""
        self._samples.append(sample)
        same = [s for s in self._samples if s.background == sample.background]
        saves = sum(s.saves for s in same)
        return sum(s.stall_s for s in same) / saves, sum(s.drag_s for s in same) / saves


def young_daly_interval(ckpt_cost_s: float, mtbf_s: float, step_s: float, max_steps: int) -> int:
    """Checkpoint interval in steps minimising expected lost + checkpoint time: sqrt(2 C M)."""
    if step_s <= 0:
        return max_steps
    steps = math.sqrt(2.0 * max(ckpt_cost_s, 1e-4) * mtbf_s) / step_s
    return max(1, min(max_steps, int(round(steps))))
