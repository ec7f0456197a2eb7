"""Sampling with a KV cache: temperature, top-k, top-p, stop strings, batches."""

from __future__ import annotations

from collections.abc import Iterator

import mlx.core as mx
import numpy as np

from .model import GPT, KVCache


def _filter_logits(logits: mx.array, top_k: int | None, top_p: float | None) -> mx.array:
    """Set logits outside the top-k / nucleus to -inf. logits: (B, vocab)."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = mx.sort(logits, axis=-1)[:, -top_k][:, None]
        logits = mx.where(logits < kth, -mx.inf, logits)
    if top_p is not None and top_p < 1.0:
        order = mx.argsort(-logits, axis=-1)
        sorted_logits = mx.take_along_axis(logits, order, axis=-1)
        probs = mx.softmax(sorted_logits, axis=-1)
        # keep a token if the mass before it is below top_p (the first is always kept)
        keep_sorted = (mx.cumsum(probs, axis=-1) - probs) < top_p
        keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
        logits = mx.where(keep, logits, -mx.inf)
    return logits


def generate_tokens(
    model: GPT,
    prompt_ids: np.ndarray,
    max_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    use_cache: bool = True,
) -> Iterator[np.ndarray]:
    """Yield the next token id of each sequence, (B,), `max_tokens` times.

    `prompt_ids` is (T,) or (B, T). With the cache, each step feeds one token;
    when the context fills, the last half of it is re-encoded (positions are
    absolute, so cached keys cannot simply slide). Without the cache, every step
    re-runs the whole (cropped) context: the reference the cache is tested against.
    Greedy decoding when temperature is 0. Same seed, same tokens.
    """
    model.eval()
    block = model.config.block_size
    ids = np.atleast_2d(np.asarray(prompt_ids, dtype=np.int32))
    if ids.shape[1] == 0:
        raise ValueError("prompt is empty")
    ids = ids[:, -block:]
    key = mx.random.key(seed)
    cache: KVCache | None = None
    logits, cache = model(mx.array(ids))
    history = ids
    for _ in range(max_tokens):
        last = logits[:, -1, :]
        if temperature == 0:
            nxt = mx.argmax(last, axis=-1)
        else:
            key, sub = mx.random.split(key)
            nxt = mx.random.categorical(_filter_logits(last / temperature, top_k, top_p), key=sub)
        nxt_np = np.array(nxt, dtype=np.int32)
        yield nxt_np
        history = np.concatenate([history, nxt_np[:, None]], axis=1)
        if not use_cache:
            logits, _ = model(mx.array(history[:, -block:]))
        elif cache[0][0].shape[2] < block:
            logits, cache = model(mx.array(nxt_np[:, None]), cache)
        else:
            logits, cache = model(mx.array(history[:, -(block // 2 + 1) :]))


def generate(model: GPT, prompt_ids: np.ndarray, max_tokens: int, **kwargs) -> np.ndarray:
    """All generated ids, (B, max_tokens) or (max_tokens,) for a 1-D prompt."""
    out = np.stack(list(generate_tokens(model, prompt_ids, max_tokens, **kwargs)), axis=-1)
    return out[0] if np.ndim(prompt_ids) == 1 else out
