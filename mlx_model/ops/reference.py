"""The reference backend: MLX's own operations, on any device and in any dtype."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import mlx.core as mx
import mlx.nn as nn

if TYPE_CHECKING:
    from ..config import GPTConfig


def split_heads(qkv: mx.array, n_head: int) -> tuple[mx.array, mx.array, mx.array]:
    """q, k, v, each (B, n_head, T, head_dim), from the fused projection (B, T, 3C)."""
    B, T, _ = qkv.shape
    return tuple(
        t.reshape(B, T, n_head, -1).transpose(0, 2, 1, 3) for t in mx.split(qkv, 3, axis=-1)
    )


def merge_heads(y: mx.array) -> mx.array:
    """(B, n_head, T, head_dim) -> (B, T, C)."""
    B, H, T, D = y.shape
    return y.transpose(0, 2, 1, 3).reshape(B, T, H * D)


def attention_weights(q: mx.array, k: mx.array, scale: float) -> mx.array:
    """Causal softmax(q k^T * scale), (B, H, Tq, Tk); queries are the last Tq of Tk."""
    tq, tk = q.shape[2], k.shape[2]
    future = mx.arange(tk)[None, :] > (mx.arange(tq)[:, None] + tk - tq)
    scores = (q * scale) @ k.transpose(0, 1, 3, 2)
    scores = mx.where(future, mx.array(-mx.inf, scores.dtype), scores)
    return mx.softmax(scores, axis=-1, precise=True)


class Reference:
    """MLX's matrix products, gathers, layer norm, tanh GELU, Bernoulli dropout, fused
    attention, cross-entropy."""

    name = "reference"
    lanes = 1
    # train with one optimizer update over all parameters (`mlx_model.train.make_optimizer`)
    joined_optimizer = False
    compiles_inference = True  # evaluation and generation compiled (ops.compiles_inference)

    def __init__(self, training: bool):
        self.training = training

    def signature(self, dtype: mx.Dtype, model: GPTConfig | None = None) -> dict[str, str]:
        """What else decides the numbers this backend computes in `dtype` when it trains
        `model` (see `mlx_model.ops.signature`)."""
        return {}

    def linear(self, x, weight, bias):
        """x (..., n_in) W^T + b in x's dtype (MLX's addmm), weight (n_out, n_in) and bias
        (n_out,) or None cast to it -> (..., n_out)."""
        w = weight.astype(x.dtype)
        if bias is None:
            return x @ w.T
        return mx.addmm(bias.astype(x.dtype), x, w.T)

    def layer_norm(self, x, weight, bias, eps):
        bias = bias.astype(x.dtype) if bias is not None else None
        return mx.fast.layer_norm(x, weight.astype(x.dtype), bias, eps)

    def gelu(self, x):
        return nn.gelu_approx(x)

    def dropout(self, x, p):
        if not self.training or p == 0:
            return x
        keep = mx.random.bernoulli(1.0 - p, x.shape)
        return mx.where(keep, x * (1.0 / (1.0 - p)), mx.array(0.0, x.dtype))

    def embed(self, ids, wte, wpe, dtype, positions=None):
        pos = wpe[: ids.shape[1]] if positions is None else wpe[positions]
        return (wte[ids] + pos).astype(dtype)

    def cache_write(self, buffer, new, offset):
        return mx.slice_update(buffer, new, offset, axes=(2,))

    def cross_entropy(self, logits, targets):
        return nn.losses.cross_entropy(logits, targets, reduction="none")

    def decode(self, tokens, caches, weights, n_head, eps):
        """Logits (B, vocab) of one new token per sequence through the whole model, from
        caches it updates; None: this backend has no fused step, the model runs its layers."""
        return None

    def causal_attention(self, qkv, n_head, dropout):
        q, k, v = split_heads(qkv, n_head)
        scale = 1.0 / math.sqrt(q.shape[-1])
        if self.training and dropout > 0:
            # dropout on the attention weights, as GPT-2: MLX's fused kernel has no such option
            y = self.dropout(attention_weights(q, k, scale), dropout) @ v
        else:
            mask = "causal" if q.shape[2] > 1 else None
            y = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        return merge_heads(y)
