"""The CUDA backend's dropout kernel (mlx_model/ops/cuda.py); runs only where MLX has CUDA."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlx_model import ops
from mlx_model.config import GPTConfig
from mlx_model.model import GPT, loss_fn
from mlx_model.ops import cpu, cuda

pytestmark = pytest.mark.skipif(not cuda.available(), reason="needs MLX's CUDA backend")


def pure_mlx_masks(x: mx.array, seed: mx.array, p: float) -> mx.array:
    """ops.cpu.dropout's formula with an explicit seed."""
    index = mx.arange(x.size, dtype=mx.uint32).reshape(x.shape)
    keep = cpu._hash32(index + seed * 0x9E3779B9) >= cuda.threshold(p)
    return mx.where(keep, x * (1.0 / (1.0 - p)), mx.array(0.0, x.dtype))


@pytest.mark.parametrize("shape", [(3, 70, 16), (1, 1, 5), (64, 6, 256, 256)])
@pytest.mark.parametrize("p", [0.2, 0.05])
def test_kernel_draws_the_masks_of_the_cpu_backends(shape, p):
    x = mx.random.normal(shape)
    seed = mx.array([123456789], dtype=mx.uint32)
    assert mx.array_equal(cuda._masked(x, seed, p), pure_mlx_masks(x, seed, p)).item()


def test_drop_rate_is_p_and_the_gradient_applies_the_same_mask():
    x = mx.random.normal((1024, 1024)) + 10.0  # no element is zero before dropout
    ct = mx.random.normal(x.shape)
    mx.random.seed(5)
    y = cuda.dropout(x, 0.2)
    assert abs((y == 0).mean().item() - 0.2) < 0.002
    mx.random.seed(5)
    g = mx.grad(lambda t: (cuda.dropout(t, 0.2) * ct).sum())(x)
    assert mx.array_equal(g, mx.where(y == 0, 0.0, ct * 1.25)).item()


def test_bfloat16_and_the_training_step_use_it():
    x = mx.random.normal((4, 8, 32)).astype(mx.bfloat16)
    seed = mx.array([7], dtype=mx.uint32)
    got = cuda._masked(x, seed, 0.1)
    assert got.dtype == mx.bfloat16
    assert mx.array_equal(got, pure_mlx_masks(x, seed, 0.1)).item()
    assert ops.backend(mx.bfloat16, True).name == "cuda"
    cfg = GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_emb=16, dropout=0.2)
    model = GPT(cfg)
    idx = mx.random.randint(0, 11, (4, 16))
    step = mx.compile(nn.value_and_grad(model, loss_fn))
    mx.random.seed(1)
    a = step(model, idx, idx)[0].item()
    mx.random.seed(1)
    assert step(model, idx, idx)[0].item() == a
