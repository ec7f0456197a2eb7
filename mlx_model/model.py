"""GPT-2: token and learned position embeddings, pre-LayerNorm blocks of causal
self-attention and a tanh-GELU MLP, a final LayerNorm and the LM head.

The operations come from `mlx_model.ops`, which picks their implementation per
device, dtype and mode; this file is the model and nothing else.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from . import ops
from .cache import KVCache
from .config import GPTConfig


class Linear(nn.Module):
    """y = x W^T + b, computing in the input's dtype while the weights stay float32."""

    def __init__(self, n_in: int, n_out: int, bias: bool, std: float = 0.02):
        super().__init__()
        self.weight = mx.random.normal((n_out, n_in)) * std
        if bias:
            self.bias = mx.zeros((n_out,))

    def __call__(self, x: mx.array) -> mx.array:
        return ops.linear(x, self.weight, self.bias if "bias" in self else None, self.training)


class LayerNorm(nn.Module):
    def __init__(self, dims: int, bias: bool, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dims,))
        if bias:
            self.bias = mx.zeros((dims,))

    def __call__(self, x: mx.array) -> mx.array:
        bias = self.bias if "bias" in self else None
        return ops.layer_norm(x, self.weight, bias, self.eps, self.training)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, proj_std: float):
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.attention_dropout = cfg.attention_p
        self.c_attn = Linear(cfg.n_emb, 3 * cfg.n_emb, cfg.bias)  # q, k, v in one product
        self.c_proj = Linear(cfg.n_emb, cfg.n_emb, cfg.bias, std=proj_std)

    def __call__(self, x: mx.array, cache: KVCache | None = None) -> mx.array:
        qkv = self.c_attn(x)  # (B, T, 3C)
        if cache is None:
            y = ops.causal_attention(qkv, self.n_head, self.attention_dropout, self.training)
        else:
            y = self._cached(qkv, cache)
        return ops.dropout(self.c_proj(y), self.dropout, self.training)

    def _cached(self, qkv: mx.array, cache: KVCache) -> mx.array:
        """Attention of new tokens to themselves and to the tokens the cache holds."""
        q, k, v = ops.split_heads(qkv, self.n_head)  # (B, n_head, T, head_dim)
        mask = cache.mask(q.shape[2])
        keys, values = cache.update_and_fetch(k, v)  # (B, n_head, block_size, head_dim)
        scale = 1.0 / math.sqrt(q.shape[-1])
        y = mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask)
        return ops.merge_heads(y)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig, proj_std: float):
        super().__init__()
        self.dropout = cfg.dropout
        self.c_fc = Linear(cfg.n_emb, 4 * cfg.n_emb, cfg.bias)
        self.c_proj = Linear(4 * cfg.n_emb, cfg.n_emb, cfg.bias, std=proj_std)

    def __call__(self, x: mx.array) -> mx.array:
        h = ops.gelu(self.c_fc(x), self.training)  # (B, T, 4C)
        return ops.dropout(self.c_proj(h), self.dropout, self.training)


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, proj_std: float):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_emb, cfg.bias)
        self.attn = CausalSelfAttention(cfg, proj_std)
        self.ln_2 = LayerNorm(cfg.n_emb, cfg.bias)
        self.mlp = MLP(cfg, proj_std)

    def __call__(self, x: mx.array, cache: KVCache | None = None) -> mx.array:
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Token + learned position embeddings, pre-LN blocks, final LN, LM head.

    Initialised as GPT-2: weights N(0, 0.02), residual projections scaled by
    1/sqrt(2 * n_layer), biases zero.
    """

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        proj_std = 0.02 / math.sqrt(2 * cfg.n_layer)
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_emb)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_emb)
        self.wte.weight = mx.random.normal(self.wte.weight.shape) * 0.02
        self.wpe.weight = mx.random.normal(self.wpe.weight.shape) * 0.02
        self.h = [Block(cfg, proj_std) for _ in range(cfg.n_layer)]
        self.ln_f = LayerNorm(cfg.n_emb, cfg.bias)
        if not cfg.tie_weights:
            self.lm_head = Linear(cfg.n_emb, cfg.vocab_size, bias=False)

    def __call__(
        self, idx: mx.array, cache: list[KVCache] | None = None, dtype: mx.Dtype = mx.float32
    ) -> mx.array:
        """Logits (B, T, vocab) in float32 for token ids (B, T), computed in `dtype`.

        With a cache (`make_cache`), `idx` continues the sequence it holds, and the
        cache is updated in place.
        """
        x = self.embed(idx, cache, dtype)
        caches = cache if cache is not None else [None] * len(self.h)
        for block, layer_cache in zip(self.h, caches, strict=True):
            x = block(x, layer_cache)
        return self.head(x)  # (B, T, vocab)

    def loss(self, idx: mx.array, targets: mx.array, dtype: mx.Dtype = mx.float32) -> mx.array:
        """Next-token cross-entropy (B, T) of `targets` (B, T) after token ids `idx` (B, T),
        computed in `dtype`."""
        return ops.cross_entropy(self(idx, dtype=dtype), targets, self.training)

    def embed(
        self, idx: mx.array, cache: list[KVCache] | None = None, dtype: mx.Dtype = mx.float32
    ) -> mx.array:
        """Token plus position embeddings with dropout: (B, T) ids -> (B, T, C) in `dtype`;
        positions continue the cache's sequence where one is given."""
        T = idx.shape[1]
        if cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence length {T} exceeds block_size {self.config.block_size}")
            x = ops.embed(idx, self.wte.weight, self.wpe.weight, self.training, dtype)
        else:
            pos = cache[0].positions(T)  # (T,)
            x = ops.embed(idx, self.wte.weight, self.wpe.weight, self.training, dtype, pos)
        return ops.dropout(x.astype(dtype), self.config.dropout, self.training)  # (B, T, C)

    def head(self, x: mx.array) -> mx.array:
        """Final layer norm and LM head: (B, T, C) -> float32 logits (B, T, vocab)."""
        w = self.wte.weight if self.config.tie_weights else self.lm_head.weight
        return (self.ln_f(x) @ w.astype(x.dtype).T).astype(mx.float32)

    def decode(self, tokens: mx.array, cache: list[KVCache]) -> mx.array:
        """Logits (B, vocab) of one new token per sequence (tokens (B,)) continuing the
        sequences in `cache`, which is updated: one step of generation. The ops backend
        may run it as one fused kernel; otherwise the blocks run as in `__call__`."""
        eps = self.ln_f.eps
        logits = ops.decode(tokens, cache, self.decode_weights(), self.config.n_head, eps)
        if logits is None:
            logits = self(tokens[:, None], cache)[:, -1]
        return logits

    def decode_weights(self) -> list[mx.array]:
        """The weights in GPT-2's order for a fused decoding kernel: wte, wpe, the head,
        ln_f's weight and bias, then per block ln_1 (w, b), c_attn (W, b), attn c_proj
        (W, b), ln_2 (w, b), c_fc (W, b), mlp c_proj (W, b); a missing bias is zeros."""

        def b(module) -> mx.array:
            return module.bias if "bias" in module else mx.zeros((module.weight.shape[0],))

        head = self.wte.weight if self.config.tie_weights else self.lm_head.weight
        out = [self.wte.weight, self.wpe.weight, head, self.ln_f.weight, b(self.ln_f)]
        for block in self.h:
            for m in (block.ln_1, block.attn.c_attn, block.attn.c_proj, block.ln_2,
                      block.mlp.c_fc, block.mlp.c_proj):  # fmt: skip
                out += [m.weight, b(m)]
        return out

    def make_cache(self, batch: int) -> list[KVCache]:
        """An empty KV cache for `batch` sequences, one `KVCache` per layer."""
        c = self.config
        return [KVCache.empty(batch, c.n_head, c.block_size, c.head_dim) for _ in self.h]


def loss_fn(model: GPT, x: mx.array, y: mx.array, dtype: mx.Dtype = mx.float32) -> mx.array:
    """Mean next-token cross-entropy of targets y (B, T) given inputs x (B, T)."""
    return model.loss(x, y, dtype).mean()
