# ruff: noqa: I001
"""Where a training step's time goes on a GPU: the preset's compiled step (`make_step`, as
the training loop runs it: async evaluation, one step queued behind the other) timed at
several batch sizes and with parts of it switched off.

    python bench/gpu_step_anatomy.py --preset nanogpt-char

For each run: `ms_per_step` (wall per step over `--steps` steps after a warm-up) and
`host_ms_per_step` (of which the Python thread spent building and queueing the step:
the call to the compiled step plus `mx.async_eval`). A step whose host time is close to
its wall time is bound by dispatch, not by the GPU's arithmetic: then its wall time
barely changes with the batch. Variants at the preset's batch: `no-dropout` (attention
through MLX's fused kernel), `no-clip` (no gradient-norm clipping), `grads-only` (forward
and backward, no optimizer update), and the attention and dropout taken apart:
`explicit-attention-no-dropout` (the path dropout forces, scores materialised, with p=0),
`fused-attention-residual-dropout` (MLX's fused attention, dropout on the residual
branches and embeddings only), `hashed-masks` (the masks of `ops.cpu.dropout`, a hash of
each element's index, instead of `mx.random.bernoulli`). One JSON line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx_model  # noqa: E402,F401,I001  (must come before mlx.core)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402
import numpy as np  # noqa: E402

from mlx_model.config import get_preset  # noqa: E402
from mlx_model.ops import cpu as cpu_ops  # noqa: E402
from mlx_model.ops.reference import Reference, attention_weights, merge_heads, split_heads  # noqa: E402
from mlx_model.model import GPT, loss_fn  # noqa: E402
from mlx_model.train import DTYPES, make_optimizer, make_step  # noqa: E402


def grads_only_step(model, dtype):
    value_and_grad = nn.value_and_grad(model, partial(loss_fn, dtype=dtype))

    state = [model.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y):
        loss, grads = value_and_grad(model, x, y)
        return loss, grads

    return step


def timed(cfg, tc, batch: int, steps: int, grads_only: bool = False) -> dict:
    mx.random.seed(0)
    model = GPT(cfg)
    model.train()
    optimizer = make_optimizer(tc)
    optimizer.init(model.trainable_parameters())
    dtype = DTYPES[tc.compute_dtype]
    step = grads_only_step(model, dtype) if grads_only else make_step(model, optimizer, tc, dtype)
    rng = np.random.default_rng(0)
    xs = [
        mx.array(rng.integers(0, cfg.vocab_size, (batch, cfg.block_size)), dtype=mx.int32)
        for _ in range(4)
    ]

    def run(n: int) -> float:
        host = 0.0
        out = None
        for i in range(n):
            t = time.perf_counter()
            out = step(xs[i % 4], xs[(i + 1) % 4])
            mx.async_eval(out) if grads_only else mx.async_eval(
                out, model.parameters(), optimizer.state
            )
            host += time.perf_counter() - t
        mx.eval(out)
        return host

    run(10)
    t0 = time.perf_counter()
    host = run(steps)
    wall = time.perf_counter() - t0
    return {
        "batch": batch,
        "ms_per_step": round(1000 * wall / steps, 2),
        "host_ms_per_step": round(1000 * host / steps, 2),
        "tokens_per_sec": round(batch * cfg.block_size * steps / wall),
    }


def explicit_attention(self, qkv, n_head, dropout):
    q, k, v = split_heads(qkv, n_head)
    w = attention_weights(q, k, 1.0 / q.shape[-1] ** 0.5)
    return merge_heads(self.dropout(w, dropout if self.training else 0.0) @ v)


def fused_attention(self, qkv, n_head, dropout):
    return ORIGINAL["causal_attention"](self, qkv, n_head, 0.0)


def hashed_dropout(self, x, p):
    return cpu_ops.dropout(x, p) if self.training and p > 0 else x


ORIGINAL = {"causal_attention": Reference.causal_attention, "dropout": Reference.dropout}


def patched(cfg, tc, steps: int, **methods) -> dict:
    """`timed` with Reference's methods replaced by `methods` (restored after)."""
    for name, fn in methods.items():
        setattr(Reference, name, fn)
    try:
        return timed(cfg, tc, tc.batch_size, steps)
    finally:
        for name in methods:
            setattr(Reference, name, ORIGINAL[name])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="nanogpt-char")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batches", default="8,16,32,64,128,256")
    args = p.parse_args()
    preset = get_preset(args.preset)
    cfg, tc = preset.model.replace(vocab_size=65), preset.train
    out = {"preset": args.preset, "device": str(mx.default_device()), "mlx": mx.__version__}
    out["by_batch"] = [timed(cfg, tc, int(b), args.steps) for b in args.batches.split(",")]
    out["no-dropout"] = timed(cfg.replace(dropout=0.0), tc, tc.batch_size, args.steps)
    out["no-clip"] = timed(cfg, tc.replace(grad_clip=0.0), tc.batch_size, args.steps)
    out["grads-only"] = timed(cfg, tc, tc.batch_size, args.steps, grads_only=True)
    no_drop = cfg.replace(dropout=0.0)
    out["explicit-attention-no-dropout"] = patched(
        no_drop, tc, args.steps, causal_attention=explicit_attention
    )
    out["fused-attention-residual-dropout"] = patched(
        cfg, tc, args.steps, causal_attention=fused_attention
    )
    out["hashed-masks"] = patched(cfg, tc, args.steps, dropout=hashed_dropout)
    out["hashed-masks, fused-attention-residual-dropout"] = patched(
        cfg, tc, args.steps, dropout=hashed_dropout, causal_attention=fused_attention
    )
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
