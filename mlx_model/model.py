"""GPT-2-shaped language model in pure MLX, with a KV cache for generation."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from . import _fused, fastops
from ._blas import cpu_lanes
from .config import GPTConfig

KVCache = list[tuple[mx.array, mx.array] | None]


def _cpu_float32(x: mx.array) -> bool:
    """MLX's CPU kernels for exp/tanh are slow; use the multiply-add versions there."""
    return x.dtype == mx.float32 and mx.default_device() == mx.cpu


def _kernels(module: nn.Module, x: mx.array):
    """The fused CPU kernels (mlx_model._fused) for this module's op on x, or None:
    on the CPU in float32, when the module's `use_fused` is on and they could be built."""
    return _fused.load() if module.use_fused and _cpu_float32(x) else None


def _attention_weights(q: mx.array, k: mx.array, scale: float) -> mx.array:
    """Causal softmax(q k^T * scale), (B, H, Tq, Tk)."""
    tq, tk = q.shape[2], k.shape[2]
    future = mx.arange(tk)[None, :] > (mx.arange(tq)[:, None] + tk - tq)
    scores = (q * scale) @ k.transpose(0, 1, 3, 2)
    scores = mx.where(future, mx.array(-mx.inf, scores.dtype), scores)
    return mx.softmax(scores, axis=-1, precise=True)


@functools.cache
def _lane_streams(n: int) -> tuple[mx.Stream, ...]:
    return tuple(mx.new_stream(mx.cpu) for _ in range(n))


def in_lanes(fn: Callable[..., Any], lanes: int, *xs: mx.array) -> Any:
    """fn(*xs), with the batch (axis 0) split over `lanes` CPU streams that run at once.

    MLX's CPU backend runs a stream's work on one thread, so one stream uses one
    core. Each lane computes fn on its share of the batch (forward, and backward
    too, since autodiff keeps each op on its stream); the outputs (any tree of
    arrays) are joined again along axis 0. fn must treat batch rows independently.
    Lanes join after every block, which keeps the lanes' work side by side in
    MLX's queue: MLX lets only a bounded number of tasks run ahead, so two whole
    models in two streams would mostly run one after the other.
    """
    n = min(lanes, xs[0].shape[0])
    if n <= 1:
        return fn(*xs)
    bounds = [xs[0].shape[0] * i // n for i in range(1, n)]
    splits = [mx.split(x, bounds, axis=0) for x in xs]
    outs = []
    for lane, stream in enumerate(_lane_streams(n)):
        with mx.stream(stream):
            outs.append(fn(*(parts[lane] for parts in splits)))
    return tree_map(lambda *parts: mx.concatenate(parts, axis=0), outs[0], *outs[1:])


class Dropout(nn.Module):
    """Inverted dropout; on the CPU in float32 its masks come from `fastops.dropout`."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def __call__(self, x: mx.array) -> mx.array:
        if not self.training or self.p == 0:
            return x
        if _cpu_float32(x):
            return fastops.dropout(x, self.p)
        keep = mx.random.bernoulli(1.0 - self.p, x.shape)
        return mx.where(keep, x * (1.0 / (1.0 - self.p)), mx.array(0.0, x.dtype))


class Linear(nn.Module):
    """y = x W^T + b, computing in the input's dtype while the weights stay float32."""

    def __init__(self, n_in: int, n_out: int, bias: bool, std: float = 0.02):
        super().__init__()
        self.weight = mx.random.normal((n_out, n_in)) * std
        if bias:
            self.bias = mx.zeros((n_out,))

    def __call__(self, x: mx.array) -> mx.array:
        w = self.weight.astype(x.dtype)
        if "bias" in self:
            return mx.addmm(self.bias.astype(x.dtype), x, w.T)
        return x @ w.T


class LayerNorm(nn.Module):
    def __init__(self, dims: int, bias: bool, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = mx.ones((dims,))
        if bias:
            self.bias = mx.zeros((dims,))
        self.use_fused = True  # see GPT.use_fused_kernels

    def __call__(self, x: mx.array) -> mx.array:
        if self.training and "bias" in self and _cpu_float32(x):  # its backward is faster
            if (ext := _kernels(self, x)) is not None:
                return ext.layer_norm(x, self.weight, self.bias, self.eps)
            return fastops.layer_norm(x, self.weight, self.bias, self.eps)
        bias = self.bias.astype(x.dtype) if "bias" in self else None
        return mx.fast.layer_norm(x, self.weight.astype(x.dtype), bias, self.eps)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig, proj_std: float):
        super().__init__()
        self.n_head = cfg.n_head
        self.c_attn = Linear(cfg.n_emb, 3 * cfg.n_emb, cfg.bias)  # fused q, k, v
        self.c_proj = Linear(cfg.n_emb, cfg.n_emb, cfg.bias, std=proj_std)
        self.dropout = cfg.dropout
        self.attn_drop = Dropout(cfg.dropout)
        self.resid_drop = Dropout(cfg.dropout)
        self.use_fused = True  # see GPT.use_fused_kernels

    def __call__(
        self, x: mx.array, cache: tuple[mx.array, mx.array] | None = None
    ) -> tuple[mx.array, tuple[mx.array, mx.array]]:
        B, T, C = x.shape
        qkv = self.c_attn(x)
        if cache is None and (ext := _kernels(self, x)) is not None:
            return self._fused(ext, qkv)
        q, k, v = self._heads(qkv)
        if cache is not None:
            k = mx.concatenate([cache[0], k], axis=2)
            v = mx.concatenate([cache[1], v], axis=2)
        scale = 1.0 / math.sqrt(q.shape[-1])
        drop = self.training and self.dropout > 0
        if _cpu_float32(q):
            y = fastops.causal_attention(q, k, v, scale, self.attn_drop if drop else None)
        elif drop:
            # dropout on the attention weights, as GPT-2: the fused kernel has no such option
            y = self.attn_drop(_attention_weights(q, k, scale)) @ v
        else:
            # "causal" aligns the mask to the last query, so cached decoding sees every past key.
            mask = "causal" if T > 1 else None
            y = mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
        y = y.transpose(0, 2, 1, 3).reshape(B, T, C)
        return self.resid_drop(self.c_proj(y)), (k, v)

    def _heads(self, qkv: mx.array) -> tuple[mx.array, ...]:
        """q, k, v (B, n_head, T, head_dim) from the fused projection (B, T, 3C)."""
        B, T, _ = qkv.shape
        return tuple(
            t.reshape(B, T, self.n_head, -1).transpose(0, 2, 1, 3)
            for t in mx.split(qkv, 3, axis=-1)
        )

    def _fused(self, ext, qkv: mx.array) -> tuple[mx.array, tuple[mx.array, mx.array]]:
        """Attention by the fused CPU primitive: from qkv (B, T, 3C) straight to (B, T, C)."""
        p = self.dropout if self.training else 0.0
        # the primitive's dropout masks are seeded from MLX's generator
        seed = fastops.dropout_seed() if p > 0 else mx.zeros((1,), mx.uint32)
        scale = 1.0 / math.sqrt(qkv.shape[-1] // 3 // self.n_head)
        y = ext.causal_attention(qkv, seed, self.n_head, scale, p)
        _, k, v = self._heads(qkv)  # the cache, for generation's prefill; lazy, unused in training
        return self.resid_drop(self.c_proj(y)), (k, v)

    def decode(
        self, x: mx.array, pos: mx.array, visible: mx.array, cache: tuple[mx.array, mx.array]
    ) -> tuple[mx.array, tuple[mx.array, mx.array]]:
        """One new token per sequence against a fixed-size cache (B, H, block, D).

        The new key/value goes to slot `pos` (an int32 array of shape (1,));
        `visible` (1, 1, 1, block) marks the positions the query may attend to.
        Shapes never change, so a decoding step compiles once.
        """
        B, _, C = x.shape
        q, k, v = mx.split(self.c_attn(x), 3, axis=-1)
        q, k, v = (t.reshape(B, 1, self.n_head, -1).transpose(0, 2, 1, 3) for t in (q, k, v))
        keys = mx.slice_update(cache[0], k, pos, axes=(2,))
        values = mx.slice_update(cache[1], v, pos, axes=(2,))
        scale = 1.0 / math.sqrt(q.shape[-1])
        y = mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=visible)
        return self.c_proj(y.transpose(0, 2, 1, 3).reshape(B, 1, C)), (keys, values)


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig, proj_std: float):
        super().__init__()
        self.c_fc = Linear(cfg.n_emb, 4 * cfg.n_emb, cfg.bias)
        self.c_proj = Linear(4 * cfg.n_emb, cfg.n_emb, cfg.bias, std=proj_std)
        self.drop = Dropout(cfg.dropout)
        self.use_fused = True  # see GPT.use_fused_kernels

    def __call__(self, x: mx.array) -> mx.array:
        h = self.c_fc(x)
        if not _cpu_float32(h):
            h = nn.gelu_approx(h)
        elif self.training and (ext := _kernels(self, h)) is not None:
            h = ext.gelu(h)
        elif self.training:
            h = fastops.gelu(h)  # with its closed-form backward
        else:
            h = fastops.gelu_forward(h)  # plain ops, which fuse with their neighbours
        return self.drop(self.c_proj(h))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig, proj_std: float):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.n_emb, cfg.bias)
        self.attn = CausalSelfAttention(cfg, proj_std)
        self.ln_2 = LayerNorm(cfg.n_emb, cfg.bias)
        self.mlp = MLP(cfg, proj_std)

    def __call__(self, x, cache=None):
        a, cache = self.attn(self.ln_1(x), cache)
        x = x + a
        x = x + self.mlp(self.ln_2(x))
        return x, cache

    def decode(self, x, pos, visible, cache):
        a, cache = self.attn.decode(self.ln_1(x), pos, visible, cache)
        x = x + a
        return x + self.mlp(self.ln_2(x)), cache


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
        self.drop = Dropout(cfg.dropout)
        self.h = [Block(cfg, proj_std) for _ in range(cfg.n_layer)]
        self.ln_f = LayerNorm(cfg.n_emb, cfg.bias)
        if not cfg.tie_weights:
            self.lm_head = Linear(cfg.n_emb, cfg.vocab_size, bias=False)
        # On the CPU, batches run over one stream per core (see `in_lanes`): an
        # execution setting, like a thread count, so it is not part of the config.
        self.lanes = cpu_lanes()

    def __call__(
        self,
        idx: mx.array,
        cache: KVCache | None = None,
        dtype: mx.Dtype = mx.float32,
    ) -> tuple[mx.array, KVCache]:
        """Logits (B, T, vocab) in float32 for token ids (B, T), and the updated cache.

        With a cache, `idx` continues the sequence the cache holds; positions
        start after the cached length.
        """
        B, T = idx.shape
        offset = 0 if cache is None or cache[0] is None else cache[0][0].shape[2]
        if offset + T > self.config.block_size:
            raise ValueError(
                f"sequence length {offset + T} exceeds block_size {self.config.block_size}"
            )
        cache = cache if cache is not None else [None] * len(self.h)
        pos = mx.arange(offset, offset + T)
        x = self.drop((self.wte(idx) + self.wpe(pos)).astype(dtype))  # (B, T, C)
        lanes = self.lanes if _cpu_float32(x) else 1
        new_cache: KVCache = []
        for block, layer_cache in zip(self.h, cache, strict=True):
            if layer_cache is None:
                x, layer_cache = in_lanes(block, lanes, x)
            else:  # continuing a cached sequence: batch rows are already laid out
                x, layer_cache = block(x, layer_cache)
            new_cache.append(layer_cache)
        head = self.wte.weight if self.config.tie_weights else self.lm_head.weight
        logits = in_lanes(lambda z: self.ln_f(z) @ head.astype(dtype).T, lanes, x)  # (B, T, V)
        return logits.astype(mx.float32), new_cache

    def decode(
        self, idx: mx.array, pos: mx.array, cache: list[tuple[mx.array, mx.array]]
    ) -> tuple[mx.array, list[tuple[mx.array, mx.array]]]:
        """Logits (B, vocab) for tokens idx (B,) at position `pos` (a scalar array).

        `cache` holds, per layer, keys and values of shape (B, H, block_size, D)
        whose first `pos` slots are filled (see `pad_cache`); slot `pos` is written.
        Inference only (no dropout), float32.
        """
        block = self.config.block_size
        pos = pos.astype(mx.int32).reshape(1)
        visible = (mx.arange(block) <= pos).reshape(1, 1, 1, block)
        x = self.wte(idx[:, None]) + self.wpe(pos)[None]
        new_cache = []
        for block_, layer_cache in zip(self.h, cache, strict=True):
            x, layer_cache = block_.decode(x, pos, visible, layer_cache)
            new_cache.append(layer_cache)
        head = self.wte.weight if self.config.tie_weights else self.lm_head.weight
        return (self.ln_f(x) @ head.T)[:, 0], new_cache

    def pad_cache(self, cache: KVCache) -> list[tuple[mx.array, mx.array]]:
        """Copy a growing cache (from a full forward pass) into fixed block_size buffers."""
        block = self.config.block_size

        def pad(a: mx.array) -> mx.array:
            width = [(0, 0), (0, 0), (0, block - a.shape[2]), (0, 0)]
            return mx.pad(a, width)

        return [(pad(k), pad(v)) for k, v in cache]

    def use_fused_kernels(self, on: bool = True) -> None:
        """Whether training on the CPU in float32 uses the fused C++ primitives
        (attention, GELU, layer norm; see mlx_model._fused) when they could be built,
        or pure MLX. On by default; an execution setting, like `lanes`, not config."""
        for module in self.modules():
            if hasattr(module, "use_fused"):
                module.use_fused = on

    def num_params(self) -> int:
        return sum(v.size for _, v in tree_flatten(self.parameters()))


def loss_fn(model: GPT, x: mx.array, y: mx.array, dtype: mx.Dtype = mx.float32) -> mx.array:
    """Mean next-token cross-entropy of targets y (B, T) given inputs x (B, T)."""
    logits, _ = model(x, dtype=dtype)
    return nn.losses.cross_entropy(logits, y, reduction="mean")
