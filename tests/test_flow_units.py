"""Unit tests of the flow's pure parts: parameters, the group plan, chaos specs, Young/Daly."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from pydantic import ValidationError

from flows.params import TrainParams, parse_duration_s
from flows.plan import (
    CheckpointPrice,
    ConfigurationError,
    background_saves,
    build_plan,
    make_groups,
    price_sample,
    young_daly_interval,
)
from tasks.chaos import ChaosEvent, parse_chaos


def test_groups_cover_every_step_once_and_never_cross_an_epoch_end() -> None:
    groups = make_groups(stop_at=95, total=100, group_steps=20, epoch_steps=30)
    assert groups[0].first_step == 0 and groups[-1].last_step == 95
    for a, b in zip(groups, groups[1:], strict=False):
        assert a.last_step == b.first_step
    assert all(g.last_step - g.first_step <= 20 for g in groups)
    ends = [g.last_step for g in groups if g.epoch_end]
    assert ends == [30, 60, 90]
    assert all(g.first_step // 30 == (g.last_step - 1) // 30 for g in groups)


def test_durations() -> None:
    assert parse_duration_s("2h") == 7200
    assert parse_duration_s("90") == 90
    assert parse_duration_s("1.5m") == 90
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration_s("soon")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"run_id": "../escape"}, "run-id"),
        ({"time_budget": "forever"}, "duration"),
        ({"chaos": "explode@3"}, "KIND@STEP"),
        ({"chaos": "raise@0"}, "positive"),
        ({"ckpt_every": 0}, "ckpt-every"),
        ({"replicas": 17}, "replicas"),
        ({"replicas": 2, "vote_every": 3}, "replica-policy vote"),
        ({"chaos": "perturb-replica@5"}, "replicas"),
        ({"until": 50, "steps": 10}, "past"),
        ({"steps": 0}, "greater than"),
    ],
)
def test_bad_parameters_are_refused_with_the_field_named(fields: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TrainParams(**fields)


def test_chaos_spec_parses_every_kind_and_random() -> None:
    plan = parse_chaos("kill-worker@120, raise@300,corrupt-latest@200,random:0.25")
    assert plan.events == (
        ChaosEvent("kill-worker", 120),
        ChaosEvent("raise", 300),
        ChaosEvent("corrupt-latest", 200),
    )
    assert plan.random_p == 0.25
    assert plan.events_at(300) == [ChaosEvent("raise", 300)]


def test_random_chaos_is_a_pure_function_of_the_seed() -> None:
    plan = parse_chaos("random:0.5")
    draws = [plan.random_events(7, s, s + 10) for s in range(0, 400, 10)]
    assert draws == [plan.random_events(7, s, s + 10) for s in range(0, 400, 10)]
    fired = [d for d in draws if d]
    assert 5 < len(fired) < 35  # p=0.5 over 40 groups
    assert all(10 * i < d[0].step <= 10 * i + 10 for i, d in enumerate(draws) if d)


def test_young_daly_grows_with_checkpoint_cost_and_mtbf() -> None:
    cheap = young_daly_interval(0.01, 3600, 0.3, 10_000)
    dear = young_daly_interval(1.0, 3600, 0.3, 10_000)
    assert dear > cheap >= 1
    assert young_daly_interval(1.0, 3600, 0.3, 50) == 50  # capped at the group size


def test_a_dropped_warm_trainer_stays_dropped() -> None:
    # A task that took the warm trainer, then a failure dropped the cache (this task's or
    # another's): putting it back must not bring back memory that matches no checkpoint.
    from tasks import worker_cache as cache

    key = ("run", "hash")
    held = cache.WarmTrainer(key, trainer=object(), at_ref=None)  # type: ignore[arg-type]
    cache.put_warm(held)
    assert cache.take_warm(key) is held
    cache.drop_warm()
    cache.put_warm(held)
    assert cache.take_warm(key) is None
    fresh = cache.WarmTrainer(key, trainer=object(), at_ref=None)  # type: ignore[arg-type]
    cache.put_warm(fresh)
    assert cache.take_warm(key) is fresh


@pytest.mark.parametrize(("argv", "expected"), [
    ([], "auto"), (["--async-save"], True), (["--async-save", "on"], True),
    (["--async-save", "off"], False), (["--async-save", "auto"], "auto"),
])
def test_async_save_takes_on_off_and_auto(argv: list[str], expected: bool | str) -> None:
    from flows.cli import parse_params

    params, _ = parse_params(argv)
    assert params.async_save == expected and type(params.async_save) is type(expected)


def test_async_save_auto_is_on_where_a_gpu_trains_and_off_on_cpu_workers() -> None:
    # A CPU worker's cores all train: a background save there costs the steps it overlaps
    # more than an in-line save stalls them (README, "Saves off the training path").
    assert background_saves(TrainParams(device="cpu")) is False
    assert background_saves(TrainParams(device="cuda")) is True
    assert background_saves(TrainParams(device="cuda", replicas=2)) is True
    assert background_saves(TrainParams(device="cpu", async_save=True)) is True
    assert background_saves(TrainParams(device="cuda", async_save=False)) is False


def test_checkpoint_price_comes_from_the_newest_groups_that_measured_it() -> None:
    # In line: what the saves stood training still for, nothing slowed.
    inline = price_sample({"ckpt_s": 0.6, "checkpoints": [10, 20, 30]})
    assert inline is not None and not inline.background and inline.saves == 3
    assert CheckpointPrice().add(inline) == pytest.approx((0.2, 0.0))
    assert price_sample({"ckpt_s": 0.0, "checkpoints": []}) is None
    # In the background: a group whose only save was its last (nothing trained beside it)
    # measured no drag, and a zero there would price a save at its snapshot alone.
    assert price_sample({"ckpt_s": 0.004, "checkpoints": [50], "background_saves": 1,
                         "background_stall_s": 0.004, "background_drag_s": 0.0,
                         "background_overlap_steps": 0}) is None

    def background(stall_s: float, drag_s: float, saves: int) -> dict:
        return {"ckpt_s": stall_s, "checkpoints": list(range(saves)), "background_saves": saves,
                "background_stall_s": stall_s, "background_drag_s": drag_s,
                "background_overlap_steps": 2 * saves}

    price = CheckpointPrice(window=3)
    price.add(inline)
    # A group that saved every step queued its saves (its stall is mostly the wait); an
    # in-line sample says nothing of a background save's drag, so only background ones count.
    assert price.add(price_sample(background(6.0, 15.0, 50))) == pytest.approx((0.12, 0.3))
    # Pooled over the newest three groups' saves, so a noisy group moves it less...
    assert price.add(price_sample(background(0.02, 0.64, 4))) == pytest.approx((6.02 / 54, 15.64 / 54))
    price.add(price_sample(background(0.02, 0.80, 4)))
    # ...and the queued group is forgotten once three newer ones have measured.
    assert price.add(price_sample(background(0.02, 0.48, 4))) == pytest.approx((0.005, 0.16))


def test_the_clis_corpus_is_handed_to_the_flows_plan_once(tmp_path: Path) -> None:
    import shutil

    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(Path(argparse.__file__), data / "argparse.py")
    params = TrainParams(model="tiny", data=str(data), steps=20)
    first = build_plan(params, hand_over=True)
    shutil.rmtree(data)
    # The flow's plan takes the corpus the CLI read: the same plan, without reading again...
    assert build_plan(params) == first
    # ...once: the next plan reads the data, which is gone now.
    with pytest.raises(ConfigurationError, match="data path not found"):
        build_plan(params)


def test_a_save_lost_behind_training_is_made_up_at_the_next_attempt() -> None:
    from tasks.jobs import GroupJob
    from tasks.rank_runner import _lost_save

    group = GroupJob(run=None, first_step=10, last_step=20, ckpt_every=5)  # type: ignore[arg-type]
    # Memory at 17, newest commit 10: the save of 15 was lost, save now.
    assert _lost_save(group, 17, 10)
    # Committed (by the thread the failure did not reach): nothing to make up.
    assert not _lost_save(group, 17, 15)
    # At 15 itself the old rule saves (a multiple of ckpt_every); before 15 nothing was due.
    assert not _lost_save(group, 15, 10) and not _lost_save(group, 14, 10)
    # The group's start was committed before it began.
    assert not _lost_save(GroupJob(run=None, first_step=15, last_step=20,  # type: ignore[arg-type]
                                   ckpt_every=5), 17, 15)


def test_the_clis_wall_time_splits_into_start_up_before_the_flow_and_orchestration_after() -> None:
    from flows.report import restamp_wall

    parts = {"startup_s": 1.0, "train_s": 6.0, "eval_s": 1.0, "checkpoint_stall_s": 0.5,
             "recovery_s": 0.0, "lost_s": 0.0, "orchestration_s": 1.5}
    summary = {"wall_s": 10.0, "productive_s": 6.0, "ettr": 0.6, "wall_breakdown": dict(parts)}
    # 5 s more than the flow saw: 3 s before it (API, cluster), 2 s after (closing them).
    restamp_wall(summary, 15.0, after_s=2.0)
    got = summary["wall_breakdown"]
    assert (got["startup_s"], got["orchestration_s"]) == (4.0, 3.5)
    assert sum(got.values()) == pytest.approx(summary["wall_s"]) and summary["ettr"] == 0.4
