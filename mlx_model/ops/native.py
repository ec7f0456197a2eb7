"""The native CPU kernels (`csrc/cpu_kernels.cpp`): MLX primitives for the embeddings,
causal self-attention, GPT-2's GELU, layer norm, dropout and cross-entropy, each with its
backward, and the whole model's decoding step; their build, and the backend that uses
them.

MLX lets a C++ extension add primitives; Python cannot. The attention keeps each
(batch, head)'s scores in cache, where the pure-MLX formulation
(`ops.cpu.causal_attention`) streams them through memory six to eight times; GELU and
layer norm are loops built for this CPU, where MLX's compiled element-wise kernels
use SSE2 only. See the source for the details.

The extension is compiled on first use with the system C++ compiler against the
installed MLX's headers and `libmlx`, and `nanobind` (a dependency on Linux: the
binding library MLX itself is built with, whose ABI it must share) and cached in
`~/.cache/shakespeare-gpt/` under a key of everything that goes into it, including
the CPU's features (it is built for this CPU, `-march=native`). A build takes about
8 s on a 2-core machine. If anything is missing or fails, `load()` warns once and
returns None, and `mlx_model.ops` picks the pure-MLX CPU backend instead. Linux only:
that is where it is built and tested.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import mlx.core as mx

from ..runtime.build import built, cpu_features, load_extension, plan_mlx_extension, unbuilt
from . import cpu

SOURCE = Path(__file__).parent / "csrc" / "cpu_kernels.cpp"
MODULE = "_cpu_kernels"
BUILD_TIMEOUT_S = 300

_lock = threading.Lock()


class BuildError(RuntimeError):
    """The extension could not be built or loaded here."""


def load() -> ModuleType | None:
    """The extension module, built if needed; None (after one warning) if it cannot be."""
    if not sys.platform.startswith("linux"):
        return None
    return _load_once()


@functools.cache
def _load_once() -> ModuleType | None:
    with _lock:
        return load_extension(
            _planned,
            _import,
            BuildError,
            "the native CPU kernels are not available ({err}); training on the CPU uses pure "
            "MLX, which is slower. Set SHAKESPEARE_GPT_OPS=cpu to silence this.",
        )


def build() -> Path:
    """The cached extension library, compiled if missing; BuildError says why it cannot be."""
    return built(_planned)


def needs_build() -> bool:
    """Whether `build()` would compile (the first use for this MLX install and compiler)."""
    if not sys.platform.startswith("linux") or _load_once.cache_info().currsize:
        return False
    return unbuilt(_planned, BuildError)


def _planned() -> tuple[Path, Callable[[Path], Path]]:
    """The cached library's path and the function that builds it into a folder."""
    flags = ["-O3", "-march=native", "-fno-trapping-math", "-std=c++20"]
    return plan_mlx_extension(
        MODULE, SOURCE, flags, key=[cpu_features()], timeout=BUILD_TIMEOUT_S, error=BuildError
    )


def _import(lib: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(MODULE, lib)
    if spec is None or spec.loader is None:
        raise BuildError(f"cannot import {lib}")
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        # a nanobind whose ABI differs from mlx.core's would not know mlx arrays
        with mx.stream(mx.cpu):
            y = module.causal_attention(mx.ones((1, 2, 6)), mx.zeros((1,), mx.uint32), 1, 1.0, 0.0)
            mx.eval(y)
    except (ImportError, TypeError, RuntimeError) as err:
        raise BuildError(f"the built extension {lib.name} does not work with MLX: {err}") from err
    if y.shape != (1, 2, 2) or not mx.allclose(y, mx.ones_like(y)).item():
        raise BuildError(f"the built extension {lib.name} computes a wrong result")
    return module


class Native(cpu.Cpu):
    """The CPU backend with the native kernels in place of the pure-MLX forms they fuse."""

    name = "native"

    def __init__(self, training: bool, lanes: int, ext: ModuleType):
        super().__init__(training, lanes)
        self.ext = ext

    def layer_norm(self, x, weight, bias, eps):
        if not self.training or bias is None:
            return super().layer_norm(x, weight, bias, eps)
        return self.ext.layer_norm(x, weight, bias, eps)

    def dropout(self, x, p):
        if not self.training or p == 0:
            return x
        return self.ext.dropout(x, cpu.dropout_seed(), p)  # the masks of cpu.dropout

    def gelu(self, x):
        return self.ext.gelu(x) if self.training else super().gelu(x)

    def embed(self, ids, wte, wpe, dtype, positions=None):
        if positions is not None:  # continuing a cache: the primitive starts at position 0
            return super().embed(ids, wte, wpe, dtype, positions)
        return self.ext.embed(ids.astype(mx.int32), wte, wpe).astype(dtype)

    def cross_entropy(self, logits, targets):
        return self.ext.cross_entropy(logits, targets.astype(mx.int32))

    def decode(self, tokens, caches, weights, n_head, eps):
        if self.training or tokens.dtype != mx.int32:
            return None
        L = len(caches)
        out = self.ext.decode_step(
            tokens, caches[0].offset, weights,
            [c.keys for c in caches], [c.values for c in caches], n_head, eps,
        )  # fmt: skip
        for cache, k, v in zip(caches, out[2 : 2 + L], out[2 + L :], strict=True):
            cache.keys, cache.values, cache.offset = k, v, out[1]
            if cache.filled is not None:  # one token per sequence, written by the kernel
                cache.filled += 1
        return out[0]

    def causal_attention(self, qkv, n_head, dropout):
        p = dropout if self.training else 0.0
        # the primitive's dropout masks are seeded from MLX's generator
        seed = cpu.dropout_seed() if p > 0 else mx.zeros((1,), mx.uint32)
        scale = 1.0 / math.sqrt(qkv.shape[-1] // 3 // n_head)
        return self.ext.causal_attention(qkv, seed, n_head, scale, p)
