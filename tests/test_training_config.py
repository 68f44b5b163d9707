"""Configs, presets and the LR schedule: validation names the field, the hash covers the math."""

import json
import math
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import pytest

from training.config import ResolvedTrainConfig, TrainConfig
from training.hparams import HPARAM_NAMES
from training.model import ModelConfig
from training.presets import (
    ALL_PRESETS,
    PRESET_DIR,
    PRESETS,
    describe_presets,
    get_preset,
    get_preset_hparams,
    load_preset_file,
)
from training.schedule import lr_at


def test_presets_are_data_files_and_all_resolve():
    assert {"tiny", "small"} <= set(PRESETS)
    assert {p.stem for p in PRESET_DIR.glob("*.json")} == set(PRESETS)
    for name in PRESETS:
        cfg = TrainConfig(model=name).resolved()
        assert cfg.model == get_preset(name)
        assert cfg.steps == get_preset_hparams(name).steps
        assert name in describe_presets()
    tiny, small = get_preset("tiny"), get_preset("small")
    assert tiny.n_layer * tiny.n_embd < small.n_layer * small.n_embd


def test_unknown_preset_lists_valid_names():
    with pytest.raises(ValueError, match=r"'huge'.*small.*tiny|'huge'.*tiny.*small"):
        get_preset("huge")
    with pytest.raises(ValueError, match="huge"):
        TrainConfig(model="huge")


def test_bad_preset_file_names_file_and_problem(tmp_path: Path):
    good = json.loads((PRESET_DIR / "tiny.json").read_text())
    cases = {
        "missing": {**good, "train": {k: v for k, v in good["train"].items() if k != "lr"}},
        "badmodel": {**good, "model": {**good["model"], "n_head": 3}},
        "badlr": {**good, "train": {**good["train"], "lr": -1}},
    }
    for name, content in cases.items():
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=f"{name}.json"):
            load_preset_file(path)
    assert set(HPARAM_NAMES) == set(good["train"])


def test_defaults_resolve_to_small_preset():
    cfg = TrainConfig().resolved()
    assert cfg.preset == "small" and cfg.seed == 1337
    assert cfg.model == PRESETS["small"]
    assert cfg.block_size == PRESETS["small"].block_size
    for name in HPARAM_NAMES:
        assert getattr(cfg, name) == getattr(ALL_PRESETS["small"].hparams, name)


def test_overrides_apply_and_short_runs_get_short_warmup():
    cfg = TrainConfig(model="tiny", steps=30, lr=1e-3, block_size=32, batch_size=4).resolved()
    assert (cfg.steps, cfg.lr, cfg.block_size, cfg.batch_size) == (30, 1e-3, 32, 4)
    assert cfg.model.block_size == 32
    assert cfg.warmup_steps == 3  # a tenth of steps, below the preset's own warm-up
    assert TrainConfig(model="tiny", steps=30, warmup_steps=20).resolved().warmup_steps == 20
    tiny = get_preset_hparams("tiny")
    low = TrainConfig(model="tiny", lr=tiny.lr / 100).resolved()  # below the preset's min_lr
    assert low.min_lr == pytest.approx(tiny.min_lr / 100)
    assert TrainConfig(model="tiny", lr=1e-4, min_lr=0.0).resolved().min_lr == 0.0


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"lr": -1.0}, "lr"),
        ({"lr": 0.0}, "lr"),
        ({"min_lr": 1.0}, "min_lr"),
        ({"steps": 0}, "steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"block_size": 0}, "block_size"),
        ({"warmup_steps": 10_000}, "warmup_steps"),
        ({"betas": (0.9, 1.5)}, "betas"),
        ({"grad_clip": -1.0}, "grad_clip"),
        ({"eval_batches": 0}, "eval_batches"),
        ({"seed": -3}, "seed"),
        ({"device": "tpu"}, "device"),
        ({"torch_threads": 0}, "torch_threads"),
    ],
)
def test_invalid_values_raise_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TrainConfig(model="tiny", **kwargs)


def test_model_config_validation():
    with pytest.raises(ValueError, match="n_head"):
        ModelConfig(n_embd=64, n_head=3)
    with pytest.raises(ValueError, match="dropout"):
        ModelConfig(dropout=1.0)
    with pytest.raises(ValueError, match="n_layer"):
        ModelConfig(n_layer=0)


def test_config_hash_covers_math_not_placement():
    base = TrainConfig(model="tiny")
    h = base.config_hash("data-A")
    assert len(h) == 64 and h == base.resolved().config_hash("data-A")
    assert replace(base, device="cpu", torch_threads=3).config_hash("data-A") == h
    for changed in (
        replace(base, seed=1),
        replace(base, lr=1e-4),
        replace(base, steps=77),
        replace(base, batch_size=3),
        replace(base, block_size=32),
        replace(base, model="small"),
    ):
        assert changed.config_hash("data-A") != h, changed
    assert base.config_hash("data-B") != h


def test_resolved_round_trips_through_json():
    cfg = TrainConfig(model="tiny", steps=50, torch_threads=1).resolved()
    again = ResolvedTrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    assert again.config_hash("x") == cfg.config_hash("x")
    assert json.loads(json.dumps(TrainConfig().to_dict()))["steps"] is None


def test_schedule_warmup_then_cosine_to_min_lr():
    cfg = TrainConfig(model="tiny", steps=100, warmup_steps=10, lr=1e-3, min_lr=1e-4).resolved()
    assert lr_at(0, cfg) == pytest.approx(1e-3 / 11)
    warm = [lr_at(s, cfg) for s in range(11)]
    assert all(a < b for a, b in pairwise(warm))
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    decay = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in pairwise(decay))
    assert lr_at(55, cfg) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))  # halfway: cos = 0
    assert lr_at(100, cfg) == pytest.approx(1e-4) and lr_at(500, cfg) == pytest.approx(1e-4)
    no_warmup = replace(cfg, warmup_steps=0)
    assert lr_at(0, no_warmup) == pytest.approx(1e-3)
    assert all(math.isfinite(lr_at(s, replace(cfg, warmup_steps=100))) for s in range(101))
