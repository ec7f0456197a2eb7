"""The CPU backend in pure MLX: multiply-add forms where MLX's CPU kernels are slow.

On Linux CPUs `mx.exp`, `mx.tanh` and friends run at roughly 15-25 ns per element,
against about 0.5 ns for a multiply-add, so GELU and softmax dominate a training
step. Here both are written with multiply-adds and one division: an exp by range
reduction (2^n built from the exponent bits, 2^f by a degree-7 polynomial, as
accurate as mx.exp), and GELU through it. Inside a compiled graph they fuse into one
pass. Gradients are given in closed form so autodiff does not differentiate through
the polynomials.

The mathematics stay GPT-2's: GELU is GPT-2's tanh form (written as the identical
x * sigmoid(2u)), softmax is exact up to float32 rounding and masked positions get
exactly zero weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import mlx.core as mx

from .reference import Reference, merge_heads, split_heads

_EXP2_P = (
    1.0,
    0.6931471805599453,
    0.2402265069591007,
    0.05550410866482158,
    0.009618129107628477,
    0.0013333558146428443,
    0.00015403530393381606,
    1.525273380405984e-05,
)
_LOG2E = 1.4426950408889634
GELU_K = 0.7978845608028654  # sqrt(2 / pi)
GELU_C = 0.044715


def _estrin(x: mx.array, coeffs: tuple[float, ...]) -> mx.array:
    """sum(c_i x^i) by Estrin's scheme: the same multiply-adds as Horner's in a graph of
    depth log2(n) instead of n. MLX's compiler splits deep chains of element-wise ops into
    several slower kernels; a degree-7 Horner chain after the range reduction ran slower
    than this (docs/BENCHMARKS.md)."""
    terms: list = list(coeffs)
    power = x
    while len(terms) > 1:
        if len(terms) % 2:
            terms.append(0.0)
        terms = [terms[i] + terms[i + 1] * power for i in range(0, len(terms), 2)]
        if len(terms) > 1:
            power = power * power
    return terms[0]


def exp(x: mx.array) -> mx.array:
    """exp for float32 inputs; inputs below -87 give exp(-87) ~ 1.6e-38 (callers mask).

    x log2(e) = n + f with n the nearest integer and |f| <= 1/2; 2^n is built from the
    exponent bits and 2^f by its degree-7 Taylor polynomial (truncation error 5e-9, so
    float32 rounding dominates): relative error 5.5e-7 for |x| < 10, against 5.0e-7 for
    `mx.exp`, and the same as `mx.exp` further out, where rounding x log2(e) dominates.
    """
    t = mx.clip(x, -87.0, 88.0) * _LOG2E
    n = mx.round(t)
    scale = mx.view(mx.left_shift(n.astype(mx.int32) + 127, 23), mx.float32)  # 2^n
    return _estrin(t - n, _EXP2_P) * scale


def _gelu_and_sigmoid(x: mx.array) -> tuple[mx.array, mx.array]:
    """GPT-2's GELU 0.5 x (1 + tanh(u)), u = k (x + c x^3), as x * sigmoid(2u) (the same
    function: 0.5 (1 + tanh(u)) = 1 / (1 + exp(-2u))), and that sigmoid. One exp and one
    division instead of a rational tanh."""
    s = 1.0 / (1.0 + exp(-2.0 * GELU_K * (x + GELU_C * x * x * x)))
    return x * s, s


def _gelu_grad(x: mx.array, s: mx.array, cotangent: mx.array) -> mx.array:
    """d gelu / dx = s + x s (1 - s) 2 k (1 + 3 c x^2), reusing the forward's sigmoid s."""
    d = s + x * s * (1.0 - s) * (2.0 * GELU_K) * (1.0 + 3.0 * GELU_C * x * x)
    return cotangent * d


def _masked_softmax(scores: mx.array, keep: mx.array) -> mx.array:
    scores = mx.where(keep, scores, -1e30)
    e = exp(scores - mx.max(scores, axis=-1, keepdims=True)) * keep
    return e / mx.sum(e, axis=-1, keepdims=True)


def _softmax_grad(p: mx.array, cotangent: mx.array) -> mx.array:
    return p * (cotangent - mx.sum(cotangent * p, axis=-1, keepdims=True))


# A custom function's backward runs on whatever stream is the default when autodiff
# reaches it, not on the forward's stream. Training on the CPU runs the model in
# several streams at once (see `mlx_model.ops.in_lanes`), so each stream gets its own copy of
# these functions, whose backward is pinned to the stream of the forward.
_per_stream: dict[tuple[str, str], mx.custom_function] = {}


def _on_current_stream(name: str, forward, backward) -> mx.custom_function:
    stream = mx.default_stream(mx.default_device())
    key = (name, repr(stream))
    if key not in _per_stream:
        fn = mx.custom_function(forward)

        @fn.vjp
        def _vjp(primals, cotangent, output):
            with mx.stream(stream):
                return backward(primals, cotangent, output)

        _per_stream[key] = fn
    return _per_stream[key]


def _layer_norm(x: mx.array, weight: mx.array, bias: mx.array, eps: float):
    mean = mx.mean(x, axis=-1, keepdims=True)
    centred = x - mean
    rstd = mx.rsqrt(mx.mean(centred * centred, axis=-1, keepdims=True) + eps)
    xhat = centred * rstd
    return xhat * weight + bias, xhat, rstd


def _layer_norm_grad(primals, cotangents, outputs):
    dy, xhat, rstd = cotangents[0], outputs[1], outputs[2]
    g = dy * primals[1]  # the weight
    dx = rstd * (
        g - mx.mean(g, axis=-1, keepdims=True) - xhat * mx.mean(g * xhat, axis=-1, keepdims=True)
    )
    rows = tuple(range(dy.ndim - 1))
    return dx, mx.sum(dy * xhat, axis=rows), mx.sum(dy, axis=rows)


def layer_norm(x: mx.array, weight: mx.array, bias: mx.array, eps: float) -> mx.array:
    """Layer norm over the last axis with a closed-form backward."""
    fn = _on_current_stream(
        f"layer_norm{eps}", lambda x, w, b: _layer_norm(x, w, b, eps), _layer_norm_grad
    )
    return fn(x, weight, bias)[0]


def gelu_forward(x: mx.array) -> mx.array:
    """GPT-2's GELU without a custom backward, for inference."""
    return _gelu_and_sigmoid(x)[0]


def gelu(x: mx.array) -> mx.array:
    """GPT-2's GELU, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), closed-form gradient."""
    # a single input reaches the backward bare, not in a tuple; the sigmoid output has
    # no use outside, so its cotangent is zero
    fn = _on_current_stream(
        "gelu", _gelu_and_sigmoid, lambda x, ct, out: _gelu_grad(x, out[1], ct[0])
    )
    return fn(x)[0]


def masked_softmax(scores: mx.array, keep: mx.array) -> mx.array:
    """Softmax over the last axis where `keep` is 1; positions where it is 0 get weight 0."""
    fn = _on_current_stream(
        "masked_softmax",
        _masked_softmax,
        lambda primals, ct, p: (_softmax_grad(p, ct), mx.zeros_like(primals[1])),
    )
    return fn(scores, keep)


def causal_weights(q: mx.array, k: mx.array, scale: float) -> mx.array:
    """Causal attention weights (B, H, Tq, Tk); queries are the last Tq of the Tk positions."""
    tq, tk = q.shape[2], k.shape[2]
    keep = (mx.arange(tk)[None, :] <= (mx.arange(tq)[:, None] + tk - tq)).astype(q.dtype)
    scores = (q * scale) @ k.transpose(0, 1, 3, 2)  # (B, H, Tq, Tk)
    return masked_softmax(scores, keep)


def causal_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    scale: float,
    weights_fn: Callable[[mx.array], mx.array] | None = None,
    block: int = 32,
) -> mx.array:
    """Exact causal attention, q, k, v: (B, H, T, D); queries are the last Tq of Tk positions.

    Queries go in blocks of `block` rows, and each block scores only the keys up to
    its last row, so most of the masked upper triangle is never computed (5/8 of the
    full score matrix remains at T=128, 9/16 at T=256). `weights_fn` (dropout, in
    training) is applied to each block's attention weights before they meet v.
    """
    tq, tk = q.shape[2], k.shape[2]
    outs = []
    for start in range(0, tq, block):
        end = min(start + block, tq)
        keys = tk - tq + end  # the last key this block's last query may see
        w = causal_weights(q[:, :, start:end], k[:, :, :keys], scale)
        if weights_fn is not None:
            w = weights_fn(w)
        outs.append(w @ v[:, :, :keys])
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)


def _hash32(x: mx.array) -> mx.array:
    """Chris Wellons' "lowbias32" integer hash of uint32 values (wrapping arithmetic)."""
    x = x ^ (x >> 16)
    x = x * 0x7FEB352D
    x = x ^ (x >> 15)
    x = x * 0x846CA68B
    return x ^ (x >> 16)


def dropout_seed() -> mx.array:
    """One draw from MLX's generator, a uint32 array of shape (1,), to seed hashed masks."""
    return mx.random.randint(0, 2**31 - 1, (1,)).astype(mx.uint32)


def dropout(x: mx.array, p: float) -> mx.array:
    """Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p).

    MLX draws Bernoulli masks through threefry, about 6 ns per element on this CPU. Here
    one draw from MLX's generator (so `mx.random.seed` still fixes everything) seeds a
    counter-based hash of each element's index, fused into one pass: 2.5x faster. An
    element is dropped when its 32-bit hash is below round(p * 2^32), so the drop
    probability is p to within 2^-32.
    """
    index = mx.arange(x.size, dtype=mx.uint32).reshape(x.shape)
    keep = _hash32(index + dropout_seed() * 0x9E3779B9) >= round(p * 2**32)
    return mx.where(keep, x * (1.0 / (1.0 - p)), mx.array(0.0, x.dtype))


class Cpu(Reference):
    """MLX's CPU in float32: the multiply-add forms above, the batch split over lanes."""

    name = "cpu"

    def __init__(self, training: bool, lanes: int = 1):
        super().__init__(training)
        self.lanes = lanes

    def layer_norm(self, x, weight, bias, eps):
        if not self.training or bias is None:  # inference: MLX's kernel fuses with its neighbours
            return super().layer_norm(x, weight, bias, eps)
        return layer_norm(x, weight, bias, eps)

    def gelu(self, x):
        return gelu(x) if self.training else gelu_forward(x)

    def dropout(self, x, p):
        return dropout(x, p) if self.training and p > 0 else x

    def causal_attention(self, qkv, n_head, p):
        q, k, v = split_heads(qkv, n_head)
        scale = 1.0 / math.sqrt(q.shape[-1])
        drop = (lambda w: dropout(w, p)) if self.training and p > 0 else None
        return merge_heads(causal_attention(q, k, v, scale, drop))
