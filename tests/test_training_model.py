"""The GPT itself: shapes, tied weights, a seeded init that starts at the uniform loss."""

import math

import pytest
import torch

from training.model import GPT, ModelConfig
from training.presets import PRESETS

TINY = PRESETS["tiny"]


def test_forward_shapes_and_initial_loss_near_uniform():
    model = GPT(TINY)
    model.init_weights(torch.Generator().manual_seed(0))
    idx = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    logits, loss = model(idx)
    assert logits.shape == (3, 16, 256) and loss is None
    targets = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(2))
    logits, loss = model(idx, targets=targets)
    assert loss is not None and loss.dim() == 0
    assert abs(loss.item() - math.log(256)) < 0.2  # small init: close to a uniform guess


def test_weights_are_tied_and_counted_once():
    model = GPT(TINY)
    assert model.lm_head.weight is model.transformer.wte.weight
    names = [n for n, _ in model.named_parameters()]
    assert "transformer.wte.weight" in names and "lm_head.weight" not in names
    d, L, V, T = TINY.n_embd, TINY.n_layer, TINY.vocab_size, TINY.block_size
    per_block = 2 * d + 3 * d * d + d * d + 4 * d * d + 4 * d * d  # no biases in the preset
    assert model.num_params() == V * d + T * d + L * per_block + d
    print(f"tiny: {model.num_params():,} params; small: {GPT(PRESETS['small']).num_params():,}")


def test_init_is_a_function_of_the_generator():
    a, b = GPT(TINY), GPT(TINY)
    a.init_weights(torch.Generator().manual_seed(5))
    b.init_weights(torch.Generator().manual_seed(5))
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name
    b.init_weights(torch.Generator().manual_seed(6))
    assert not torch.equal(a.transformer.wte.weight, b.transformer.wte.weight)
    # Residual projections start smaller (GPT-2's 1/sqrt(2 * n_layer)); gains start at one.
    proj = a.transformer.h[0].attn.c_proj.weight.std().item()
    assert proj < a.transformer.h[0].attn.c_attn.weight.std().item()
    assert torch.equal(a.transformer.ln_f.weight, torch.ones(TINY.n_embd))


def test_causal_future_tokens_do_not_change_the_past():
    model = GPT(TINY).eval()
    idx = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(2))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 256
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert torch.allclose(a[0, :8], b[0, :8])
    assert not torch.allclose(a[0, 8:], b[0, 8:])


def test_context_longer_than_block_size_is_refused():
    model = GPT(ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=4, vocab_size=16))
    with pytest.raises(ValueError, match="block_size"):
        model(torch.zeros(1, 5, dtype=torch.long))


def test_generate_extends_the_prompt():
    model = GPT(TINY).eval()
    prompt = torch.tensor([list(b"def ")])
    out = model.generate(prompt, 10, generator=torch.Generator().manual_seed(0))
    assert out.shape == (1, 14) and torch.equal(out[:, :4], prompt)
