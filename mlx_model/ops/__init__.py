"""The operations the GPT is written in, and the one place their implementation is chosen.

`mlx_model.model` calls `embed`, `linear`, `layer_norm`, `gelu`, `dropout`, `causal_attention`
(over the fused q/k/v projection), `cross_entropy` and, for one generation step, `decode`
(the whole model in one kernel, where a backend has one). The training and evaluation
steps call `loss`: the model's loss with the batch split over the backend's CPU streams
("lanes"; one on a GPU). Each call goes to a backend chosen once per (device, dtype,
training):

- `reference` (`ops/reference.py`): MLX's own operations; every device and dtype.
- `gpu` (`ops/gpu.py`): the reference with the embedding lookup and the cross-entropy's
  pick written as one-hot products, which MLX's CUDA backend runs without compiling a
  kernel at first use (a gather or scatter compiles one).
- `cpu` (`ops/cpu.py`): MLX's CPU in float32: multiply-add forms of exp, GELU, softmax
  and layer norm with closed-form backwards, hashed dropout masks, attention in query
  blocks, the batch split over one stream per core.
- `native` (`ops/native.py`): the `cpu` backend with C++ primitives for attention, GELU,
  layer norm and dropout in training, the embeddings and cross-entropy, and the fused
  generation step, built on first use; `cpu` stands in if they cannot be built.

The choice is `auto` (native, else cpu, on the CPU in float32; gpu on an NVIDIA GPU;
reference elsewhere)
unless `SHAKESPEARE_GPT_OPS` or `use(...)` names one. All compute the same functions;
`reference` and `cpu` draw different dropout masks, and float32 rounding differs in the
last bits, so the backend and lane count are part of a training run's cache key
(`signature`).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import mlx.core as mx
from mlx.utils import tree_map

from ..runtime.lanes import cpu_lanes
from . import cuda, native

if TYPE_CHECKING:
    from ..config import GPTConfig
from .cpu import Cpu
from .gpu import Gpu
from .reference import Reference, merge_heads, split_heads

__all__ = ["merge_heads", "split_heads"]  # head layout, shared with the cached path

ENV = "SHAKESPEARE_GPT_OPS"
CHOICES = ("auto", "reference", "gpu", "cpu", "native")

_forced: list[tuple[str | None, int | None]] = []


@contextlib.contextmanager
def use(backend: str | None = None, lanes: int | None = None) -> Iterator[None]:
    """Within the block, pick `backend` (one of CHOICES) and/or `lanes` CPU streams.

    Applies to what is traced inside it: a compiled function keeps the choice it was
    traced with.
    """
    if backend is not None and backend not in CHOICES:
        raise ValueError(f"unknown ops backend {backend!r}; choose one of {list(CHOICES)}")
    if lanes is not None and (not isinstance(lanes, int) or lanes < 1):
        raise ValueError(f"lanes must be a whole number >= 1, got {lanes!r}")
    _forced.append((backend, lanes))
    try:
        yield
    finally:
        _forced.pop()


def _setting() -> tuple[str, int]:
    backend = next((b for b, _ in reversed(_forced) if b is not None), None)
    lanes = next((n for _, n in reversed(_forced) if n is not None), None)
    backend = backend or os.environ.get(ENV) or "auto"
    if backend not in CHOICES:
        raise ValueError(f"{ENV} must be one of {list(CHOICES)}, got {backend!r}")
    return backend, lanes or cpu_lanes()


def check_settings() -> None:
    """Raise ValueError naming a bad SHAKESPEARE_GPT_OPS, SHAKESPEARE_GPT_CPU_LANES or
    SHAKESPEARE_GPT_ATTENTION, before a run starts any work (they are otherwise read when
    training begins)."""
    _setting()
    cuda.choice()


def backend(dtype: mx.Dtype, training: bool) -> Reference:
    """The backend for arrays of `dtype` on the default device, in training or not."""
    on_cpu = mx.default_device() == mx.cpu
    return _choose(on_cpu, dtype == mx.float32, training, *_setting())


@functools.cache
def _choose(on_cpu: bool, float32: bool, training: bool, setting: str, lanes: int) -> Reference:
    if setting == "gpu" or (setting == "auto" and not on_cpu and mx.cuda.is_available()):
        return Gpu(training)  # named, it runs on the CPU too (for tests); Metal: reference
    if not (on_cpu and float32) or setting == "reference":
        return Reference(training)
    ext = native.load() if setting in ("auto", "native") else None
    return native.Native(training, lanes, ext) if ext is not None else Cpu(training, lanes)


def cuda_build_pending(dtype: str, model: GPTConfig | None = None) -> bool:
    """Whether choosing the backend for `dtype` here, to train `model`, will first build
    cuDNN attention and wait for it (`SHAKESPEARE_GPT_ATTENTION=cudnn`; 20.0 to 34.8 s on an
    H200 host, once per MLX install): worth a line before it starts. Under `auto` it builds
    in the background."""
    return (
        dtype in ("bfloat16", "float16")
        and (model is None or cuda.trains(model))
        and _setting()[0] in ("auto", "gpu")
        and cuda.choice() == "cudnn"
        and cuda.needs_build()
    )


def half_on_cpu(dtype: str) -> bool:
    """Whether training in `dtype` would run in half precision on the CPU, where no backend
    of this project's serves it and MLX's own operations ran the default job's model 13x to
    62x slower than in float32 (docs/BENCHMARKS.md, "Why float32 on the CPU"): a GPU
    preset run without a GPU, worth a warning before it starts."""
    return dtype in ("bfloat16", "float16") and mx.default_device() == mx.cpu


def native_build_pending(dtype: str) -> bool:
    """Whether choosing the backend for `dtype` here will first compile the native CPU
    kernels (10 to 30 s on 2 cores, once per MLX install): worth a line before it starts."""
    on_cpu = mx.default_device() == mx.cpu
    return (
        on_cpu
        and dtype == "float32"
        and _setting()[0] in ("auto", "native")
        and (native.needs_build())
    )


def signature(dtype: str, training: bool = True, model: GPTConfig | None = None) -> dict[str, Any]:
    """What decides the numbers a run computes: MLX's version, device, backend, lane count,
    and on a GPU which attention runs in training `model` (building cuDNN's the first time,
    see `ops.cuda`)."""
    chosen = backend(getattr(mx, dtype), training)
    device = str(mx.default_device())
    return {
        "mlx": mx.__version__,
        "device": device,
        "backend": chosen.name,
        "lanes": chosen.lanes,
        **chosen.signature(getattr(mx, dtype), model),
    }


def op_by_op(fn: Callable) -> Callable:
    """`fn` with MLX's compilation off while it builds its graph: the functions compiled in
    their own right inside the layers (the GELU's) then run op by op. An uncompiled loss estimate
    otherwise compiled a fused GELU of its own in the run, about 8 s of a cold run's first
    estimate on an H200 (its training steps had compiled only their gradient's)."""

    def run(*args: Any) -> Any:
        if os.environ.get("MLX_DISABLE_COMPILE", "0") not in ("", "0"):
            return fn(*args)  # off already, and enable_compile would override the user's choice
        mx.disable_compile()
        try:
            return fn(*args)
        finally:
            mx.enable_compile()

    return run


def compiles_inference() -> bool:
    """Whether evaluation and generation here run compiled (`mx.compile`), by the backend
    for float32 outside training (`Reference.compiles_inference`): not on MLX's CUDA
    backend, where NVRTC compiles each fused kernel at its first use. On a fresh H200,
    compiled, evaluating nanogpt-char on the validation split took 19.3 s and sampling
    500 tokens 24.5 s; op by op 0.20 s and 2.04 s, compiling nothing (warm: 0.13 s and
    1.44 s, against 0.054 s and 0.667 s compiled; docs/BENCHMARKS.md)."""
    return backend(mx.float32, training=False).compiles_inference


def embed(
    ids: mx.array,
    wte: mx.array,
    wpe: mx.array,
    training: bool,
    dtype: mx.Dtype = mx.float32,
    positions: mx.array | None = None,
) -> mx.array:
    """GPT-2's input, token plus position embedding: wte[ids] + wpe[positions] for ids
    (B, T), (B, T, C) in `dtype`; positions (T,) int32, 0..T-1 unless given (a sequence
    that continues a KV cache)."""
    return backend(wte.dtype, training).embed(ids, wte, wpe, dtype, positions)


def cache_write(buffer: mx.array, new: mx.array, offset: mx.array) -> mx.array:
    """`buffer` (B, H, L, D) with positions offset..offset+T replaced by `new` (B, H, T, D);
    `offset` an int32 array (1,)."""
    return backend(buffer.dtype, False).cache_write(buffer, new, offset)


def linear(x: mx.array, weight: mx.array, bias: mx.array | None, training: bool) -> mx.array:
    """x W^T + b in x's dtype: x (..., n_in), weight (n_out, n_in) and bias (n_out,) in
    any dtype (float32 in the model), cast to x's -> (..., n_out)."""
    return backend(x.dtype, training).linear(x, weight, bias)


def layer_norm(x: mx.array, weight: mx.array, bias: mx.array | None, eps: float, training: bool):
    return backend(x.dtype, training).layer_norm(x, weight, bias, eps)


def gelu(x: mx.array, training: bool) -> mx.array:
    """GPT-2's tanh GELU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return backend(x.dtype, training).gelu(x)


def dropout(x: mx.array, p: float, training: bool) -> mx.array:
    """Inverted dropout (identity outside training)."""
    return backend(x.dtype, training).dropout(x, p)


def causal_attention(qkv: mx.array, n_head: int, dropout: float, training: bool) -> mx.array:
    """Exact causal self-attention with dropout on its weights: (B, T, 3C) -> (B, T, C)."""
    return backend(qkv.dtype, training).causal_attention(qkv, n_head, dropout)


def cross_entropy(logits: mx.array, targets: mx.array, training: bool) -> mx.array:
    """Next-token cross-entropy of each position: logits (..., V) float32, integer
    targets (...) -> losses (...)."""
    return backend(logits.dtype, training).cross_entropy(logits, targets)


def decode(
    tokens: mx.array, caches: list, weights: list[mx.array], n_head: int, eps: float
) -> mx.array | None:
    """One generation step of the whole model in one fused kernel: logits (B, vocab) of
    `tokens` (B,) continuing the sequences in `caches` (updated); `weights` in the order
    `GPT.decode_weights` gives. None where the backend has no such kernel."""
    return backend(weights[0].dtype, False).decode(tokens, caches, weights, n_head, eps)


def loss(model, idx: mx.array, targets: mx.array, dtype: mx.Dtype = mx.float32) -> mx.array:
    """`model.loss(idx, targets, dtype)` for a `mlx_model.model.GPT`, the next-token
    cross-entropy (B, T) float32 of targets (B, T) after ids (B, T), with the batch split
    over the backend's CPU lanes: the embeddings over the whole batch, then each block,
    and the head with the loss, each in lanes and joined after it (see `split_batch`).
    The same function as `model.loss` within float32 rounding; on one lane (a GPU, or
    `SHAKESPEARE_GPT_CPU_LANES=1`) the same computation."""
    training = model.training
    x = model.embed(idx, dtype=dtype)  # (B, T, C)
    for block in model.h:
        x = in_lanes(block, x, training)

    def head_loss(x: mx.array, t: mx.array) -> mx.array:
        return cross_entropy(model.head(x), t, training)

    return in_lanes(head_loss, x, training, targets)


def in_lanes(fn: Callable[..., Any], x: mx.array, training: bool, *more: mx.array) -> Any:
    """fn(x, *more), with the batch (axis 0 of each) split over the backend's CPU lanes,
    run at once."""
    return split_batch(fn, backend(x.dtype, training).lanes, x, *more)


@functools.cache
def _streams(n: int) -> tuple[mx.Stream, ...]:
    return tuple(mx.new_stream(mx.cpu) for _ in range(n))


def split_batch(fn: Callable[..., Any], lanes: int, *xs: mx.array) -> Any:
    """fn(*xs), with the batch (axis 0) split over `lanes` CPU streams that run at once.

    The outputs (any tree of arrays) are joined along axis 0; fn must treat batch rows
    independently. `loss` joins lanes after every block, which keeps the lanes'
    work side by side in MLX's queue: MLX lets only a bounded number of tasks run
    ahead, so two whole models in two streams would mostly run one after the other.
    """
    n = min(lanes, xs[0].shape[0])
    if n <= 1:
        return fn(*xs)
    bounds = [xs[0].shape[0] * i // n for i in range(1, n)]
    splits = [mx.split(x, bounds, axis=0) for x in xs]
    outs = []
    for lane, stream in enumerate(_streams(n)):
        with mx.stream(stream):
            outs.append(fn(*(parts[lane] for parts in splits)))
    return tree_map(lambda *parts: mx.concatenate(parts, axis=0), outs[0], *outs[1:])
