from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_model import fastops


def test_tanh_and_exp_match_reference():
    x = mx.random.normal((10_000,)) * 6
    assert mx.abs(fastops.tanh(x) - mx.tanh(x)).max().item() < 1e-6
    y = mx.random.normal((10_000,)) * 15
    rel = mx.abs(fastops.exp(y) - mx.exp(y)) / mx.exp(y)
    assert rel.max().item() < 2e-6
    assert fastops.exp(mx.array([-1000.0])).item() < 1e-37  # clamped, masked callers zero it


def test_gelu_and_its_gradient_match_gpt2_gelu():
    x = mx.random.normal((10_000,)) * 4
    assert mx.abs(fastops.gelu(x) - nn.gelu_approx(x)).max().item() < 5e-6
    g_fast = mx.grad(lambda t: fastops.gelu(t).sum())(x)
    g_ref = mx.grad(lambda t: nn.gelu_approx(t).sum())(x)
    assert mx.abs(g_fast - g_ref).max().item() < 5e-6


@pytest.mark.parametrize("tq", [1, 5, 9])
def test_causal_attention_and_gradients_match_sdpa(tq):
    q = mx.random.normal((2, 3, tq, 8))
    k, v = mx.random.normal((2, 3, 9, 8)), mx.random.normal((2, 3, 9, 8))
    mask = "causal" if tq > 1 else None

    def ref(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.35, mask=mask)

    out = fastops.causal_attention(q, k, v, 0.35)
    assert mx.allclose(out, ref(q, k, v), atol=1e-5).item()
    g_fast = mx.grad(lambda *a: (fastops.causal_attention(*a, 0.35) ** 2).sum(), (0, 1, 2))(q, k, v)
    g_ref = mx.grad(lambda *a: (ref(*a) ** 2).sum(), (0, 1, 2))(q, k, v)
    for a, b in zip(g_fast, g_ref, strict=True):
        assert mx.allclose(a, b, atol=1e-4).item()
