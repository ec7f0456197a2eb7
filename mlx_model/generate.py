"""Sampling with a KV cache: temperature, top-k, top-p, stop strings, batches, streaming.

The cached path runs one step per token (forward pass against a fixed-size cache plus
sampling, all on the device) and keeps the device one token ahead of the host, so a token
is read back while the next is computed. The step is compiled where the ops backend
compiles inference (`ops.compiles_inference`); on MLX's CUDA backend it runs op by op:
compiled, a fresh H200 spent 24.5 s compiling before its first 500 tokens (its sampler's
settings are constants of the kernels, so each new temperature compiles again), against
2.04 s op by op, which compiles nothing; warm, 0.667 s compiled against 1.44 s.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np

from . import ops
from .cache import KVCache
from .config import SampleConfig
from .data import Vocab
from .model import GPT

Sampler = Callable[[mx.array, mx.array], tuple[mx.array, mx.array]]


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


def make_sampler(temperature: float, top_k: int | None, top_p: float | None) -> Sampler:
    """(logits (B, vocab), key) -> (token ids (B,), next key). Greedy when temperature is 0."""

    def sample(logits: mx.array, key: mx.array) -> tuple[mx.array, mx.array]:
        if temperature == 0:
            return mx.argmax(logits, axis=-1).astype(mx.int32), key
        key, sub = mx.random.split(key)
        filtered = _filter_logits(logits / temperature, top_k, top_p)
        return mx.random.categorical(filtered, key=sub).astype(mx.int32), key

    return sample


def make_decode_step(model: GPT, sample: Sampler, compiled: bool = True):
    """The one-token step: (tok (B,), cache state, key) -> (next tok, state, key), compiled
    or op by op (MLX's own compiled layers included).

    The state is `[c.state for c in cache]`; its shapes never change, so it compiles once.
    """

    def step(tok, state, key):
        cache = [KVCache(*s) for s in state]
        logits = model.decode(tok, cache)
        nxt, key = sample(logits, key)
        return nxt, [c.state for c in cache], key

    return mx.compile(step) if compiled else ops.op_by_op(step)


def generate_tokens(
    model: GPT,
    prompt_ids: np.ndarray,
    max_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    use_cache: bool = True,
    compiled: bool | None = None,
) -> Iterator[np.ndarray]:
    """Yield the next token id of each sequence, (B,), `max_tokens` times.

    `prompt_ids` is (T,) or (B, T). With the cache, each step feeds one token;
    when the context fills, the last half of it is re-encoded (positions are
    absolute, so cached keys cannot simply slide). Without the cache, every step
    re-runs the whole (cropped) context: the reference the cache is tested against.
    Greedy decoding when temperature is 0. Same seed, same tokens. The cached step is
    compiled if `compiled`, by default where the ops backend compiles inference.
    """
    model.eval()
    block = model.config.block_size
    ids = np.atleast_2d(np.asarray(prompt_ids, dtype=np.int32))
    if ids.shape[1] == 0:
        raise ValueError("prompt is empty")
    if max_tokens <= 0:
        return
    ids = ids[:, -block:]
    sample = make_sampler(temperature, top_k, top_p)
    key = mx.random.key(seed)
    if not use_cache:
        yield from _recompute(model, ids, max_tokens, sample, key)
        return

    compiled = ops.compiles_inference() if compiled is None else compiled

    def prefill(history: np.ndarray):
        cache = model.make_cache(history.shape[0])
        logits = (model if compiled else ops.op_by_op(model))(mx.array(history), cache)
        return logits[:, -1, :], [c.state for c in cache], history.shape[1]

    step = make_decode_step(model, sample, compiled)
    logits, state, pos = prefill(ids)
    tok, key = sample(logits, key)
    history = ids
    for i in range(max_tokens):
        last = i + 1 == max_tokens
        nxt = None
        if not last and pos < block:  # queue the next step before reading this token back
            nxt, state, key = step(tok, state, key)
            mx.async_eval(nxt, key)
            pos += 1
        tok_np = np.array(tok, dtype=np.int32)
        yield tok_np
        if last:
            return
        history = np.concatenate([history[:, -block:], tok_np[:, None]], axis=1)
        if nxt is None:  # the cache is full: re-encode the last half of the context
            logits, state, pos = prefill(history[:, -(block // 2 + 1) :])
            nxt, key = sample(logits, key)
        tok = nxt


def _recompute(model: GPT, ids: np.ndarray, max_tokens: int, sample: Sampler, key: mx.array):
    """The uncached reference: the whole cropped context through the model for every token."""
    block = model.config.block_size
    history = ids
    for _ in range(max_tokens):
        logits = model(mx.array(history[:, -block:]))
        tok, key = sample(logits[:, -1, :], key)
        tok_np = np.array(tok, dtype=np.int32)
        yield tok_np
        history = np.concatenate([history, tok_np[:, None]], axis=1)


def generate(model: GPT, prompt_ids: np.ndarray, max_tokens: int, **kwargs) -> np.ndarray:
    """All generated ids, (B, max_tokens) or (max_tokens,) for a 1-D prompt."""
    out = np.stack(list(generate_tokens(model, prompt_ids, max_tokens, **kwargs)), axis=-1)
    return out[0] if np.ndim(prompt_ids) == 1 else out


def _held_back(text: str, stop: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if stop.startswith(text[-n:]):
            return n
    return 0


class StopStrings:
    """Cuts streamed text before the first occurrence of any of `stops`.

    `feed(piece)` returns the text that is now known to precede every stop string;
    text that might begin one is held back until it is known not to. `hit` is set
    once a stop string has appeared (the caller stops generating); `flush()` returns
    what is held back when generation ended without one.
    """

    def __init__(self, stops: Sequence[str] = ()):
        if any(not s for s in stops):
            raise ValueError("a stop string must not be empty")
        self.stops = list(stops)
        self.hit = False
        self._pending = ""

    def feed(self, piece: str) -> str:
        if not self.stops:
            return piece
        self._pending += piece
        found = [i for i in (self._pending.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit = True
            head, self._pending = self._pending[: min(found)], ""
            return head
        keep = max(_held_back(self._pending, s) for s in self.stops)
        ready = self._pending[: len(self._pending) - keep]
        self._pending = self._pending[len(ready) :]
        return ready

    def flush(self) -> str:
        rest, self._pending = self._pending, ""
        return rest


def stream_text(model: GPT, vocab: Vocab, cfg: SampleConfig) -> Iterator[str]:
    """Yield the continuation of `cfg.prompt` piece by piece, as it is generated.

    With `cfg.stop`, generation ends at the first occurrence of the stop string,
    which is not part of the output; text that might begin it is held back until
    it is known not to.
    """
    tokens = generate_tokens(
        model,
        vocab.encode(cfg.prompt),
        cfg.max_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        seed=cfg.seed,
    )
    stops = StopStrings([cfg.stop] if cfg.stop else [])
    for tok in tokens:
        if text := stops.feed(vocab.decode(tok)):
            yield text
        if stops.hit:
            return
    if rest := stops.flush():
        yield rest


def generate_text(model: GPT, vocab: Vocab, cfg: SampleConfig) -> str:
    """The prompt and its continuation (up to, not including, the stop string)."""
    return cfg.prompt + "".join(stream_text(model, vocab, cfg))
