from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_model.ops import cpu as fastops


def test_exp_matches_reference():
    y = np.linspace(-87.0, 88.0, 100_001, dtype=np.float32)
    exact = np.exp(y.astype(np.float64))

    def rel_error(f):
        return np.abs(np.array(f(mx.array(y)), dtype=np.float64) - exact) / exact

    rel, builtin = rel_error(fastops.exp), rel_error(mx.exp)
    near = np.abs(y) < 10  # where softmax weights live; far out, float32 x*log2(e) rounds
    assert rel[near].max() < 1.25 * builtin[near].max()  # about as close as MLX's own exp
    assert rel.max() < 1.1 * builtin.max()
    assert fastops.exp(mx.array([-1000.0])).item() < 1e-37  # clamped, masked callers zero it


def test_gelu_and_its_gradient_match_gpt2_gelu():
    extremes = mx.array([0.0, -0.0, 1e-30, -12.0, -100.0, 100.0, -1e4, 1e4])
    x = mx.concatenate([mx.random.normal((10_000,)) * 4, extremes])
    assert mx.abs(fastops.gelu(x) - nn.gelu_approx(x)).max().item() < 5e-6
    g_fast = mx.grad(lambda t: fastops.gelu(t).sum())(x)
    g_ref = mx.grad(lambda t: nn.gelu_approx(t).sum())(x)
    assert mx.abs(g_fast - g_ref).max().item() < 5e-6


@pytest.mark.parametrize("block", [32, 2, 4])
@pytest.mark.parametrize("tq", [1, 5, 9])
def test_causal_attention_and_gradients_match_sdpa(tq, block):
    q = mx.random.normal((2, 3, tq, 8))
    k, v = mx.random.normal((2, 3, 9, 8)), mx.random.normal((2, 3, 9, 8))
    mask = "causal" if tq > 1 else None

    def ref(q, k, v):
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=0.35, mask=mask)

    def fast(q, k, v):  # block < tq: queries in blocks that skip the masked keys
        return fastops.causal_attention(q, k, v, 0.35, block=block)

    out = fast(q, k, v)
    assert mx.allclose(out, ref(q, k, v), atol=1e-5).item()
    g_fast = mx.grad(lambda *a: (fast(*a) ** 2).sum(), (0, 1, 2))(q, k, v)
    g_ref = mx.grad(lambda *a: (ref(*a) ** 2).sum(), (0, 1, 2))(q, k, v)
    for a, b in zip(g_fast, g_ref, strict=True):
        assert mx.allclose(a, b, atol=1e-4).item()


def test_backward_runs_on_the_forward_stream():
    """In a second CPU stream, the custom backward gives the same gradients (it is pinned
    there: a backward on the default stream would still be right, only not in parallel)."""
    x = mx.random.normal((4, 64)) * 3
    keep = (mx.arange(64)[None, :] <= 16 * mx.arange(1, 5)[:, None]).astype(mx.float32)
    ref_g = mx.grad(lambda t: (fastops.gelu(t) * fastops.masked_softmax(t, keep)).sum())(x)
    with mx.stream(mx.new_stream(mx.cpu)):
        lane_g = mx.grad(lambda t: (fastops.gelu(t) * fastops.masked_softmax(t, keep)).sum())(x)
    assert mx.allclose(ref_g, lane_g, atol=1e-6).item()
    assert len({key[1] for key in fastops._per_stream}) >= 2  # one copy per stream


def test_dropout_drops_p_scales_the_rest_and_follows_the_seed():
    x = mx.ones((1000, 1000))
    mx.random.seed(5)
    a = np.array(fastops.dropout(x, 0.1))
    dropped = (a == 0).mean()
    assert abs(dropped - 0.1) < 5 * (0.1 * 0.9 / a.size) ** 0.5  # within 5 sigma
    assert np.allclose(a[a != 0], 1 / 0.9)
    # rows and columns are not biased: per-column drop rates spread as binomial noise
    assert (a == 0).mean(axis=0).std() < 1.5 * (0.1 * 0.9 / 1000) ** 0.5
    mx.random.seed(5)
    assert np.array_equal(np.array(fastops.dropout(x, 0.1)), a)  # same seed, same mask
    b = np.array(fastops.dropout(x, 0.1))  # the generator moved on: a new mask
    assert 0.15 < ((a == 0) != (b == 0)).mean() < 0.21  # independent masks: 2 p (1 - p)
    g = np.array(mx.grad(lambda t: (fastops.dropout(t, 0.5) * 3.0).sum())(mx.ones((64, 64))))
    assert set(np.unique(g).tolist()) == {0.0, 6.0}  # the gradient passes through the mask


def test_layer_norm_and_its_gradients_match_mlx():
    x = mx.random.normal((4, 7, 32)) * 3 + 1
    w, b = mx.random.normal((32,)), mx.random.normal((32,))
    ct = mx.random.normal((4, 7, 32))

    def ours(x, w, b):
        return (fastops.layer_norm(x, w, b, 1e-5) * ct).sum()

    def ref(x, w, b):
        return (mx.fast.layer_norm(x, w, b, 1e-5) * ct).sum()

    y = fastops.layer_norm(x, w, b, 1e-5)
    assert mx.allclose(y, mx.fast.layer_norm(x, w, b, 1e-5), atol=1e-5).item()
    grads = mx.grad(ours, (0, 1, 2))(x, w, b), mx.grad(ref, (0, 1, 2))(x, w, b)
    for a, r in zip(*grads, strict=True):
        assert mx.allclose(a, r, atol=1e-4).item()
