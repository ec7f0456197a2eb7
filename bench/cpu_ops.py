"""Per-op CPU timings: built-in MLX kernels, mlx_model.ops.cpu and the native C++ kernels.

python bench/cpu_ops.py            # with the fast BLAS preload (the default)
SHAKESPEARE_GPT_BLAS=off python bench/cpu_ops.py   # the wheel's reference BLAS

The last group times one lane's share of the seed preset (batch 32 of 64), forward and
backward from a random cotangent, each new formulation against the one it replaced:
the native kernels (mlx_model.ops.native) against ops.cpu, ops.cpu against MLX's own.
"""

# ruff: noqa: I001
from __future__ import annotations

import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx_model  # noqa: E402,F401,I001  (must come before mlx.core: it preloads OpenBLAS)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from mlx_model.ops import cpu as fastops  # noqa: E402
from mlx_model.ops import native as _fused  # noqa: E402
from mlx_model.runtime import blas  # noqa: E402


def bench(name, f, *args, n=5):
    mx.eval(f(*args))
    t = time.perf_counter()
    for _ in range(n):
        mx.eval(f(*args))
    print(f"{name:40s} {(time.perf_counter() - t) / n * 1e3:8.2f} ms")


def horner_exp(x):
    """fastops.exp as it was: floor range reduction, the polynomial by Horner's rule."""
    t = mx.clip(x, -87.0, 88.0) * fastops._LOG2E
    n = mx.floor(t)
    acc = fastops._EXP2_P[-1]
    for c in reversed(fastops._EXP2_P[:-1]):
        acc = acc * (t - n) + c
    return acc * mx.view(mx.left_shift(n.astype(mx.int32) + 127, 23), mx.float32)


def fwd_bwd(f, *args):
    """Compiled forward + backward of f at args, from a fixed random cotangent."""
    cotangent = mx.random.normal(f(*args).shape)
    mx.eval(cotangent)
    grad = mx.grad(lambda *a: (f(*a) * cotangent).sum(), list(range(len(args))))
    return mx.compile(grad)


def main() -> None:
    print("BLAS preloaded:", blas.loaded)
    a, b = mx.random.normal((8192, 128)), mx.random.normal((128, 512))
    bench("matmul (8192x128)(128x512)", lambda: a @ b)
    x = mx.random.normal((8192, 512))
    bench("gelu_approx (built-in)", nn.gelu_approx, x)
    bench("fastops.gelu compiled", mx.compile(fastops.gelu), x)
    bench("grad gelu_approx (built-in)", mx.grad(lambda t: nn.gelu_approx(t).sum()), x)
    bench("grad fastops.gelu compiled", mx.compile(mx.grad(lambda t: fastops.gelu(t).sum())), x)
    s = mx.random.normal((64, 4, 128, 128))
    bench("exp (built-in)", mx.exp, s)
    bench("fastops.exp compiled", mx.compile(fastops.exp), s)
    q = mx.random.normal((64, 4, 128, 32))
    bench(
        "sdpa causal (built-in)",
        lambda: mx.fast.scaled_dot_product_attention(q, q, q, scale=0.18, mask="causal"),
    )
    bench(
        "fastops.causal_attention compiled",
        mx.compile(lambda q: fastops.causal_attention(q, q, q, 0.18)),
        q,
    )

    print("one lane of the seed preset (batch 32), forward + backward unless marked:")
    s = mx.random.uniform(-20.0, 0.0, (32, 4, 128, 128))
    bench("exp, Horner (before), forward", mx.compile(horner_exp), s, n=20)
    bench("fastops.exp, Estrin, forward", mx.compile(fastops.exp), s, n=20)
    h = mx.random.normal((32, 128, 512)) * 2
    bench("GELU, nn.gelu_approx", fwd_bwd(nn.gelu_approx, h), h, n=20)
    bench("GELU, fastops.gelu", fwd_bwd(fastops.gelu, h), h, n=20)
    ext = _fused.load()
    if ext is not None:
        bench("GELU, fused kernel", fwd_bwd(ext.gelu, h), h, n=20)
    q, k, v = (mx.random.normal((32, 4, 128, 32)) for _ in range(3))
    for block in (128, 32):
        attend = partial(fastops.causal_attention, scale=0.18, block=block)
        bench(f"attention core, query blocks of {block}", fwd_bwd(attend, q, k, v), q, k, v, n=20)
    if ext is not None:
        qkv = mx.concatenate([q, k, v], axis=1).transpose(0, 2, 1, 3).reshape(32, 128, 384)
        zero = mx.zeros((1,), mx.uint32)
        fused = partial(ext.causal_attention, seed=zero, heads=4, scale=0.18, p=0.0)
        bench("attention core, fused kernel (from qkv)", fwd_bwd(fused, qkv), qkv, n=20)
    x = mx.random.normal((32, 128, 128))
    w, b_ = mx.random.normal((128,)), mx.random.normal((128,))
    norm = partial(mx.fast.layer_norm, eps=1e-5)
    bench("layer norm, mx.fast.layer_norm", fwd_bwd(norm, x, w, b_), x, w, b_, n=20)
    bench(
        "layer norm, fastops.layer_norm",
        fwd_bwd(partial(fastops.layer_norm, eps=1e-5), x, w, b_),
        x,
        w,
        b_,
        n=20,
    )
    if ext is not None:
        bench(
            "layer norm, fused kernel",
            fwd_bwd(partial(ext.layer_norm, eps=1e-5), x, w, b_),
            x,
            w,
            b_,
            n=20,
        )
    drop = nn.Dropout(0.05)
    bench("dropout, nn.Dropout, forward", mx.compile(drop), s, n=20)
    fast_drop = mx.compile(lambda t: fastops.dropout(t, 0.05))
    bench("dropout, fastops.dropout, forward", fast_drop, s, n=20)


if __name__ == "__main__":
    main()
