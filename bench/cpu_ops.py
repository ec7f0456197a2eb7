"""Per-op CPU timings: built-in MLX kernels against mlx_model.fastops, same process.

python bench/cpu_ops.py            # with the fast BLAS preload (the default)
SHAKESPEARE_GPT_BLAS=off python bench/cpu_ops.py   # the wheel's reference BLAS
"""

# ruff: noqa: I001
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx_model  # noqa: E402,F401,I001  (must come before mlx.core: it preloads OpenBLAS)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from mlx_model import fastops  # noqa: E402


def bench(name, f, *args, n=5):
    mx.eval(f(*args))
    t = time.perf_counter()
    for _ in range(n):
        mx.eval(f(*args))
    print(f"{name:40s} {(time.perf_counter() - t) / n * 1e3:8.2f} ms")


def main() -> None:
    print("BLAS preloaded:", mlx_model._blas.loaded)
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


if __name__ == "__main__":
    main()
