"""capture_state / restore_state: readable names, exact inverse, loud on any mismatch."""

import json

import pytest
import torch

from training.config import TrainConfig
from training.data import Corpus, DataCursor, load_corpus
from training.loop import Trainer


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return load_corpus(None)


@pytest.fixture(scope="module")
def cfg():
    return TrainConfig(model="tiny", steps=20, torch_threads=1).resolved()


def _stored(tensors, meta):
    """What a round trip through the store gives back: fresh tensors, JSON metadata."""
    return {k: v.clone() for k, v in tensors.items()}, json.loads(json.dumps(meta))


def test_names_dtypes_and_metadata(corpus, cfg):
    trainer = Trainer(cfg, corpus)
    trainer.train_until(3)
    tensors, meta = trainer.capture({"loss": 1.5})
    params = dict(trainer.model.named_parameters())
    assert {k for k in tensors if k.startswith("model/")} == {f"model/{n}" for n in params}
    assert "model/transformer.wte.weight" in tensors and "model/lm_head.weight" not in tensors
    for name in params:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert f"optim/state/{name}/{key}" in tensors
    step_count = tensors["optim/state/transformer.wte.weight/step"]
    assert step_count.dim() == 0 and float(step_count) == 3.0
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in tensors.values())
    # CPU state goes out without a copy: the store writes it straight from the model.
    wte = tensors["model/transformer.wte.weight"]
    assert wte.data_ptr() == trainer.model.transformer.wte.weight.data_ptr()
    assert not wte.requires_grad
    assert meta["step"] == 3 and (meta["epoch"], meta["position"]) == (0, 3)
    assert meta["loss"] == 1.5
    assert [g["weight_decay"] for g in meta["param_groups"]] == [cfg.weight_decay, 0.0]
    assert meta["param_groups"][0]["params"][0] == "transformer.wte.weight"
    json.dumps(meta)  # must be plain JSON
    with pytest.raises(ValueError, match="reserved"):
        trainer.capture({"step": 9})


def test_restore_is_exact_inverse(corpus, cfg):
    source = Trainer(cfg, corpus)
    source.train_until(4)
    tensors, meta = _stored(*source.capture())
    target = Trainer(cfg, corpus)
    target.restore(tensors, meta)
    assert target.step == 4 and target.cursor == DataCursor(0, 4)
    again, _ = target.capture()
    assert again.keys() == tensors.keys()
    for name in tensors:
        assert torch.equal(again[name], tensors[name]), name
        assert again[name].dtype == tensors[name].dtype
    # The optimizer must own its state, not share the caller's buffers.
    exp_avg = tensors["optim/state/transformer.wte.weight/exp_avg"]
    assert again["optim/state/transformer.wte.weight/exp_avg"].data_ptr() != exp_avg.data_ptr()
    # Weight tying survives the restore.
    assert target.model.lm_head.weight is target.model.transformer.wte.weight


def _mutations(tensors):
    w = "model/transformer.h.0.attn.c_attn.weight"
    yield "missing", {k: v for k, v in tensors.items() if k != w}, w
    yield "unexpected", {**tensors, "model/extra.weight": torch.zeros(2)}, "model/extra.weight"
    yield "shape", {**tensors, w: torch.zeros(3, 3)}, w
    yield "dtype", {**tensors, w: tensors[w].to(torch.float64)}, w
    bad_optim = "optim/state/transformer.h.0.attn.c_attn.weight/exp_avg"
    yield "optim shape", {**tensors, bad_optim: torch.zeros(7)}, bad_optim
    ghost = "optim/state/no.such.param/exp_avg"
    yield "optim ghost", {**tensors, ghost: torch.zeros(1)}, ghost
    yield "unknown prefix", {**tensors, "rng/state": torch.zeros(1)}, "rng/state"


def test_restore_rejects_mismatch_and_changes_nothing(corpus, cfg):
    source = Trainer(cfg, corpus)
    source.train_until(2)
    tensors, meta = _stored(*source.capture())
    target = Trainer(cfg, corpus)
    before = {k: v.clone() for k, v in target.capture()[0].items()}
    for label, bad, name in _mutations(tensors):
        with pytest.raises(ValueError, match=name.replace(".", r"\.")):
            target.restore(bad, meta)
        after = target.capture()[0]
        assert after.keys() == before.keys(), label
        assert all(torch.equal(after[k], before[k]) for k in before), label
        assert target.step == 0
    with pytest.raises(ValueError, match="lacks"):
        target.restore(tensors, {k: v for k, v in meta.items() if k != "epoch"})


def test_restore_into_another_model_shape_fails(corpus, cfg):
    small_cfg = TrainConfig(model="tiny", steps=20, block_size=32).resolved()
    tensors, meta = _stored(*Trainer(cfg, corpus).capture())
    with pytest.raises(ValueError, match="transformer.wpe.weight"):
        Trainer(small_cfg, corpus).restore(tensors, meta)
