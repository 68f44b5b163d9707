"""The Trainer: bit-exact resume, learning, evaluation that leaves training alone."""

import json
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from training.config import TrainConfig
from training.data import DataCursor, load_corpus
from training.device import resolve_device
from training.loop import Trainer


@pytest.fixture(scope="module")
def stdlib():
    return load_corpus(None)


@pytest.fixture
def short_corpus(tmp_path: Path):
    # About 5 batches per epoch on the tiny preset, so a short run crosses epoch boundaries.
    text = Path(json.__file__).read_bytes()[:3000]
    (tmp_path / "short.txt").write_bytes(text)
    return load_corpus(tmp_path / "short.txt")


def _with_dropout(cfg, p=0.1):
    # Dropout makes every step draw random numbers: the case per-step seeding must get right.
    return replace(cfg, model=replace(cfg.model, dropout=p))


def _assert_same_state(a: Trainer, b: Trainer):
    ta, ma = a.capture()
    tb, mb = b.capture()
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name
    assert ma == mb


def test_resume_is_bit_identical_across_epochs(short_corpus):
    cfg = _with_dropout(TrainConfig(model="tiny", steps=14, torch_threads=1).resolved())
    assert Trainer(cfg, short_corpus).batches_per_epoch < 7  # so the run below crosses epochs

    straight = Trainer(cfg, short_corpus)
    straight_losses = [r.loss for r in straight.train_until(14)]
    assert straight.cursor.epoch >= 2

    first = Trainer(cfg, short_corpus)
    losses = [r.loss for r in first.train_until(6)]
    tensors, meta = first.capture()
    stored = {k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(meta))
    del first
    torch.manual_seed(999)  # whatever the process did in between must not matter
    torch.rand(10)
    resumed = Trainer(cfg, short_corpus)
    resumed.restore(*stored)
    assert resumed.step == 6
    losses += [r.loss for r in resumed.train_until(14)]

    assert losses == straight_losses
    _assert_same_state(straight, resumed)


def test_fresh_init_is_a_function_of_the_seed(stdlib):
    cfg = TrainConfig(model="tiny", steps=10).resolved()
    a, b = Trainer(cfg, stdlib), Trainer(cfg, stdlib)
    _assert_same_state(a, b)
    other = Trainer(replace(cfg, seed=cfg.seed + 1), stdlib)
    assert not torch.equal(a.model.transformer.wte.weight, other.model.transformer.wte.weight)
    a.train_until(3)
    a.init_fresh()
    assert a.step == 0 and a.cursor == DataCursor(0, 0) and not a.optimizer.state
    _assert_same_state(a, b)


def test_evaluate_is_fixed_and_leaves_training_alone(stdlib):
    cfg = _with_dropout(TrainConfig(model="tiny", steps=10, torch_threads=1).resolved())
    plain, evaluated = Trainer(cfg, stdlib), Trainer(cfg, stdlib)
    plain.train_until(6)
    evaluated.train_until(3)
    first = evaluated.evaluate()
    assert first == evaluated.evaluate()  # fixed batches, eval mode: no randomness
    assert evaluated.evaluate(n_batches=1) != first
    assert evaluated.model.training
    evaluated.train_until(6)
    _assert_same_state(plain, evaluated)


def test_train_until_stops_early_and_guards_the_schedule(stdlib):
    cfg = TrainConfig(model="tiny", steps=10, torch_threads=1).resolved()
    trainer = Trainer(cfg, stdlib)
    results = trainer.train_until(8, on_step=lambda r: r.step == 3)
    assert [r.step for r in results] == [1, 2, 3] and trainer.step == 3
    assert results[-1].cursor == trainer.cursor == DataCursor(0, 3)
    assert results[0].tokens == cfg.batch_size * cfg.block_size
    assert results[0].lr < results[-1].lr  # still warming up
    assert trainer.train_until(2) == []  # already past it
    with pytest.raises(ValueError, match="beyond"):
        trainer.train_until(11)


def test_tiny_preset_learns_on_stdlib_text(stdlib):
    cfg = TrainConfig(model="tiny", steps=100, torch_threads=1).resolved()
    trainer = Trainer(cfg, stdlib)
    print(f"tiny preset: {trainer.model.num_params():,} parameters")
    before = trainer.evaluate()
    results = trainer.train_until(100)
    after = trainer.evaluate()
    first = statistics.mean(r.loss for r in results[:5])
    last = statistics.mean(r.loss for r in results[-10:])
    step_s = statistics.median(r.seconds for r in results[5:])
    print(
        f"tiny preset: median step {step_s * 1000:.1f} ms; loss {first:.2f} -> {last:.2f}; "
        f"eval {before:.2f} -> {after:.2f}"
    )
    assert 5.0 < results[0].loss < 6.0  # about ln(256) = 5.55 from a fresh init
    assert first - last > 1.0
    assert before - after > 1.0


def test_device_resolution():
    assert resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="tpu"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_resume_is_bit_identical_on_cuda(short_corpus):
    cfg = _with_dropout(TrainConfig(model="tiny", steps=8, device="cuda").resolved())
    straight = Trainer(cfg, short_corpus)
    straight.train_until(8)
    first = Trainer(cfg, short_corpus)
    first.train_until(3)
    tensors, meta = first.capture()
    resumed = Trainer(cfg, short_corpus)
    resumed.restore({k: v.clone() for k, v in tensors.items()}, meta)
    resumed.train_until(8)
    _assert_same_state(straight, resumed)


def test_training_imports_no_orchestration_or_storage():
    code = (
        "import sys, training, training.loop, training.state, training.presets\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('prefect', 'dask', 'distributed', 'storage', 'zarr'))\n"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert done.returncode == 0, done.stdout + done.stderr
