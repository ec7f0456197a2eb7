"""The GPU backend: the reference's operations, with the embedding lookup and the
cross-entropy's pick of the target's logit written as products with one-hot rows, and
attention with dropout in training as cuDNN's fused kernel (`mlx_model.ops.cuda`) where
it is built.

On MLX's CUDA backend a gather or scatter (`wte[ids]`, `take_along_axis`, and their
gradients) is a kernel compiled with NVRTC at its first use, as fused kernels are
(`mlx/backend/cuda/indexing.cpp`, MLX 0.32): four such modules, a few seconds each on a
fresh machine, in the first step of every run whose kernel cache is cold, even when the
step runs op by op while a warm-up child compiles the fused kernels
(`mlx_model.warmup`). A comparison with `arange`, a matrix product and an element-wise
product are kernels MLX ships compiled, so the op-by-op step compiles nothing.

Training on it takes one optimizer update over all parameters at once
(`mlx_model.optimizer.FlatOptimizer`), for the same reason: fewer operations to launch.

The one-hot products pay only for a small vocabulary: each costs as much arithmetic as the LM
head (2 V C FLOPs a token), so larger vocabularies keep the gathers.

In bfloat16 or float16 the GELU computes in float32 and rounds once, its derivative in
closed form (`Gpu.gelu`), the same in training and evaluation: one fused kernel each way
where MLX's `nn.gelu_approx` rounds every operation and differentiates through tanh.
On an H200, nanogpt-char's step was 0.58 to 0.65 ms faster with it (docs/BENCHMARKS.md).
In training a bias's gradient sums over T and then B (`batch_sum`): closer to the exact
sum than MLX's one column reduction, which keeps bfloat16 running sums, and less GPU time
(profiled, nanogpt-char-fast's reductions 4.4 ms of 15.0 ms of kernels a step before, 1.6
of 11.5 after, on two machines); the step's wall time, which waits on the host, showed no
gain. The layer norms' gradients stay MLX's: as products with a row of ones, they and the
biases' made the step 0.5 to 1.2 ms slower.
"""

from __future__ import annotations

import warnings
from functools import partial
from typing import TYPE_CHECKING

import mlx.core as mx

from . import cuda
from .cpu import GELU_C, GELU_K
from .reference import Reference

if TYPE_CHECKING:
    from ..config import GPTConfig

ONE_HOT_MAX_VOCAB = 1024  # above this, the one-hot products cost more than they save
_unplanned: set[tuple[int, ...]] = set()  # shapes cuDNN found no plan for, warned once


HALF = (mx.bfloat16, mx.float16)


@partial(mx.compile, shapeless=True)
def _gelu_forward(x: mx.array) -> mx.array:
    """GPT-2's GELU as x sigmoid(2u), u = k (x + c x^3) (0.5 (1 + tanh(u)) = sigmoid(2u)),
    in float32 and rounded once to x's dtype."""
    x32 = x.astype(mx.float32)
    return (x32 * mx.sigmoid(2.0 * GELU_K * (x32 + GELU_C * x32 * x32 * x32))).astype(x.dtype)


@partial(mx.compile, shapeless=True)
def _gelu_backward(x: mx.array, cotangent: mx.array) -> mx.array:
    """cotangent * (s + x s (1 - s) 2k (1 + 3 c x^2)), s = sigmoid(2u), in float32."""
    x32 = x.astype(mx.float32)
    x2 = x32 * x32
    s = mx.sigmoid(2.0 * GELU_K * (x32 + GELU_C * x2 * x32))
    d = s + x32 * s * (1.0 - s) * (2.0 * GELU_K) * (1.0 + 3.0 * GELU_C * x2)
    return (cotangent.astype(mx.float32) * d).astype(cotangent.dtype)


_gelu = mx.custom_function(_gelu_forward)


@_gelu.vjp
def _gelu_vjp(x, cotangent, output):  # one input and one output reach it bare
    return _gelu_backward(x, cotangent)


def batch_sum(g: mx.array) -> mx.array:
    """The sum of g (B, T, n) over B and T -> (n,) in g's dtype, as two reductions: over T
    (B x n sums of T terms), then over B; g of another rank: one sum over all axes but the
    last. MLX's CUDA backend plans the sum over B and T as one column reduction of B*T
    rows, which for n of B*T/32 columns or more runs one block per 32 columns, each walking
    every row (`col_reduce_looped`, `mlx/backend/cuda/reduce/col_reduce.cu`, MLX 0.32): 36
    blocks of 16,384 rows for c_attn's 1152 at nanogpt-char's batch."""
    return g.sum(axis=1).sum(axis=0) if g.ndim == 3 else g.sum(axis=tuple(range(g.ndim - 1)))


@mx.custom_function
def _linear(x: mx.array, w: mx.array, b: mx.array) -> mx.array:
    return mx.addmm(b, x, w.T)


@_linear.vjp
def _linear_vjp(primals, cotangent, output):
    """MLX's own gradient of addmm, but the bias's summed by `batch_sum`."""
    x, w, _ = primals
    rows = cotangent.reshape(-1, cotangent.shape[-1])
    dw = rows.T @ x.reshape(-1, x.shape[-1])  # (n_out, n_in)
    return cotangent @ w, dw, batch_sum(cotangent)


def one_hot(ids: mx.array, n: int, dtype: mx.Dtype) -> mx.array:
    """Rows of `n` with a 1 at each id: ids (...) -> (..., n) in `dtype`."""
    return (ids[..., None] == mx.arange(n, dtype=ids.dtype)).astype(dtype)


class Gpu(Reference):
    """The reference, with no gather or scatter for vocabularies up to ONE_HOT_MAX_VOCAB."""

    name = "gpu"
    joined_optimizer = True  # launch-bound: one update over all parameters (see make_optimizer)
    compiles_inference = False  # NVRTC's first compile costs more than fusion saves them

    def signature(self, dtype: mx.Dtype, model: GPTConfig | None = None) -> dict[str, str]:
        """Which attention runs in training (`ops.cuda.for_run`): cuDNN's fused kernel
        (its dropout masks differ from MLX's) or MLX's operations. For a `model` whose
        attention the kernel would not run (`ops.cuda.trains`), MLX's, and nothing is
        built."""
        fused = (
            dtype in (mx.bfloat16, mx.float16)
            and (model is None or cuda.trains(model))
            and cuda.for_run() is not None
        )
        return {"attention": "cudnn" if fused else "mlx"}

    def linear(self, x, weight, bias):
        """The reference's x (B, T, n_in) W^T + b in x's dtype -> (B, T, n_out); in training,
        the bias's gradient sums over the batch in two reductions (`batch_sum`). Other
        ranks, or no bias: the reference's."""
        if not self.training or bias is None or x.ndim != 3:
            return super().linear(x, weight, bias)
        return _linear(x, weight.astype(x.dtype), bias.astype(x.dtype))

    def gelu(self, x):
        """In half precision (training and evaluation alike), GPT-2's GELU in float32 with
        its derivative in closed form, each one fused kernel rounded once (`_gelu_forward`,
        `_gelu_backward`). MLX's `nn.gelu_approx` rounds every operation to x's dtype,
        raises to the power 3, and its gradient differentiates through tanh (cosh and
        powers): the two fused kernels with those took 13% of nanogpt-char's profiled
        kernel time on an H200 (docs/runs/profile-char-h200-20261201i-1.txt)."""
        if x.dtype in HALF:
            return _gelu(x)
        return super().gelu(x)

    def causal_attention(self, qkv, n_head, dropout):
        if self.training and dropout > 0 and cuda.supports(qkv, n_head):
            ext = cuda.for_run()
            if ext is not None and qkv.shape not in _unplanned:
                try:
                    return cuda.causal_attention(ext, qkv, n_head, dropout)  # (B, T, C)
                except RuntimeError as err:  # cuDNN has no plan for this shape here
                    _unplanned.add(qkv.shape)
                    warnings.warn(
                        f"cuDNN attention cannot run {qkv.shape} here ({err}); it runs as "
                        "MLX operations",
                        RuntimeWarning,
                        stacklevel=2,
                    )
        return super().causal_attention(qkv, n_head, dropout)

    def embed(self, ids, wte, wpe, dtype, positions=None):
        """wte[ids] + wpe[positions] as one_hot(ids) @ wte in `dtype` (and positions given,
        one_hot(positions) @ wpe): the product picks each row exactly (one term,
        accumulated in float32), then rounds it to `dtype`; in float32 on a GPU, MLX's
        matrix products round their inputs to TF32 (as the blocks' do) unless
        MLX_ENABLE_TF32=0, so in sampling's cached forward the position rows are rounded
        so too, where the uncached forward adds them exactly."""
        vocab = wte.shape[0]
        big_context = positions is not None and wpe.shape[0] > ONE_HOT_MAX_VOCAB
        if vocab > ONE_HOT_MAX_VOCAB or big_context:
            return super().embed(ids, wte, wpe, dtype, positions)
        tok = one_hot(ids, vocab, dtype) @ wte.astype(dtype)  # (B, T, C)
        if positions is None:
            return tok + wpe[: ids.shape[1]].astype(dtype)
        return tok + one_hot(positions, wpe.shape[0], dtype) @ wpe.astype(dtype)  # (T, C)

    def cache_write(self, buffer, new, offset):
        """One position (a generation step): a select against the positions (kernels MLX
        ships compiled); more: the reference's write at an array offset."""
        if new.shape[2] != 1:
            return super().cache_write(buffer, new, offset)
        here = mx.arange(buffer.shape[2], dtype=offset.dtype)[:, None] == offset  # (L, 1)
        return mx.where(here, new.astype(buffer.dtype), buffer)

    def cross_entropy(self, logits, targets):
        """logsumexp(logits) - logits[target], the target's logit as a sum of products
        with a one-hot row (exact: one nonzero term)."""
        vocab = logits.shape[-1]
        if vocab > ONE_HOT_MAX_VOCAB:
            return super().cross_entropy(logits, targets)
        picked = (logits * one_hot(targets, vocab, logits.dtype)).sum(axis=-1)
        return mx.logsumexp(logits, axis=-1) - picked
