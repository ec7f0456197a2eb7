"""The backend for NVIDIA GPUs: MLX's own operations, with dropout as one custom kernel.

On an H100 the `nanogpt-char` step spent about a quarter of its time on dropout
(`bench/gpu_step_anatomy.py`): `mx.random.bernoulli` runs a threefry generator kernel
and a separate element-wise pass per call, and the pure-MLX hashed form
(`ops.cpu.dropout`) materialises an index array first. Here each thread hashes its
element's flat index with the call's seed and writes the scaled element or zero, in one
pass over the array; the backward is the same kernel over the cotangent, so no mask is
stored. The masks are exactly those of `ops.cpu.dropout` and of the native CPU kernels:
the same seed drops the same elements on every backend.

Built through `mx.fast.cuda_kernel` (compiled by MLX with NVRTC on first use per dtype
and size); used where MLX's CUDA backend is available, `reference` elsewhere.
"""

from __future__ import annotations

import functools

import mlx.core as mx

from .cpu import dropout_seed
from .reference import Reference

# lowbias32 of (index + seed * golden ratio), as ops.cpu._hash32 and csrc/cpu_kernels.cpp
_SOURCE = """
    auto i = cg::this_grid().thread_rank();
    if (i >= N) return;
    uint32_t h = static_cast<uint32_t>(i) + seed[0] * 0x9E3779B9u;
    h ^= h >> 16;
    h *= 0x7FEB352Du;
    h ^= h >> 15;
    h *= 0x846CA68Bu;
    h ^= h >> 16;
    out[i] = h >= threshold[0] ? static_cast<T>(static_cast<float>(x[i]) * scale[0])
                               : static_cast<T>(0.0f);
"""
_THREADS = 256


def available() -> bool:
    """Whether MLX's CUDA backend is here (and so `mx.fast.cuda_kernel`)."""
    return mx.cuda.is_available()


@functools.cache
def _kernel():
    return mx.fast.cuda_kernel(
        name="hashed_dropout",
        input_names=["x", "seed", "threshold", "scale"],
        output_names=["out"],
        source=_SOURCE,
    )


def threshold(p: float) -> int:
    """The 32-bit hash below which an element is dropped: round(p * 2^32)."""
    return min(round(p * 2**32), 2**32 - 1)


def _masked(x: mx.array, seed: mx.array, p: float) -> mx.array:
    if x.size >= 2**31:
        raise ValueError(f"dropout over {x.size} elements: the kernel indexes fewer than 2^31")
    out = _kernel()(
        inputs=[
            x,
            seed,
            mx.array([threshold(p)], dtype=mx.uint32),
            mx.array([1.0 / (1.0 - p)], dtype=mx.float32),
        ],
        template=[("T", x.dtype), ("N", x.size)],
        grid=(x.size, 1, 1),
        threadgroup=(_THREADS, 1, 1),
        output_shapes=[x.shape],
        output_dtypes=[x.dtype],
    )
    return out[0]


def dropout(x: mx.array, p: float) -> mx.array:
    """Inverted dropout with the hashed masks of `ops.cpu.dropout`, in one kernel each way."""

    @mx.custom_function
    def apply(x, seed):
        return _masked(x, seed, p)

    @apply.vjp
    def _vjp(primals, cotangent, output):
        return _masked(cotangent, primals[1], p), mx.zeros_like(primals[1])

    return apply(x, dropout_seed())


class Cuda(Reference):
    """MLX's operations on an NVIDIA GPU, with dropout as one hashed-mask kernel."""

    name = "cuda"

    def dropout(self, x, p):
        return dropout(x, p) if self.training and p > 0 else x
