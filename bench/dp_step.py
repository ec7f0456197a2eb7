# ruff: noqa: I001
"""Where a data-parallel step's time goes: the compiled training step of a preset, timed
under `mlx.launch` with the gradient exchange done several ways.

    mlx.launch -n 2 --backend nccl -- python bench/dp_step.py --preset nanogpt-char

Variants (each timed over `--steps` steps after a warm-up, per-rank batch `--batch`):
`local` (no exchange: each rank steps alone, the floor), `average` (`nn.average_gradients`
as `mlx_model.train` calls it), `per-array` (one all-reduce per gradient array),
`bf16` (the exchange in bfloat16). Rank 0 prints one JSON line.
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
import mlx.optimizers as optim  # noqa: E402
import numpy as np  # noqa: E402
from mlx.utils import tree_map  # noqa: E402

from mlx_model.config import get_preset  # noqa: E402
from mlx_model.model import GPT, loss_fn  # noqa: E402
from mlx_model.train import DTYPES, make_optimizer  # noqa: E402


def timed_step(
    cfg, tc, group, exchange, batch: int, steps: int, loss_sum=False, fresh=False, seed=False
) -> float:
    """ms per step; `loss_sum` also all-reduces the loss in the step, `fresh` makes a new
    input array from numpy every step, `seed` reseeds MLX's generator every step (as the
    training loop does)."""
    mx.random.seed(0)
    model = GPT(cfg)
    optimizer = make_optimizer(tc)
    optimizer.init(model.trainable_parameters())
    state = [model.state, optimizer.state, mx.random.state]
    value_and_grad = nn.value_and_grad(model, partial(loss_fn, dtype=DTYPES[tc.compute_dtype]))

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x, y):
        loss, grads = value_and_grad(model, x, y)
        grads = exchange(grads)
        if loss_sum:
            loss = mx.distributed.all_sum(loss, group=group) / group.size()
        grads, _ = optim.clip_grad_norm(grads, tc.grad_clip)
        optimizer.update(model, grads)
        return loss

    rng = np.random.default_rng(group.rank())
    x = mx.array(rng.integers(0, cfg.vocab_size, (batch, cfg.block_size)), dtype=mx.int32)
    for _ in range(10):
        loss = step(x, x)
        mx.async_eval(loss, model.parameters(), optimizer.state)
    mx.eval(loss)
    x_np = np.array(x)
    t = time.perf_counter()
    for i in range(steps):
        if seed:
            mx.random.seed(i)
        if fresh:
            x = mx.array(np.roll(x_np, i, axis=1))
        loss = step(x, x)
        mx.async_eval(loss, model.parameters(), optimizer.state)
    mx.eval(loss)
    return 1000 * (time.perf_counter() - t) / steps


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="nanogpt-char")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=100)
    args = p.parse_args()
    preset = get_preset(args.preset)
    cfg, tc = preset.model.replace(vocab_size=65), preset.train
    group = mx.distributed.init()
    world = group.size()
    variants = {
        "local": lambda g: g,
        "average": lambda g: nn.average_gradients(g, group=group),
        "per-array": lambda g: nn.average_gradients(g, group=group, all_reduce_size=0),
        "bf16": lambda g: tree_map(
            lambda a: a.astype(mx.float32),
            nn.average_gradients(tree_map(lambda a: a.astype(mx.bfloat16), g), group=group),
        ),
    }
    out = {"preset": args.preset, "world": world, "batch_per_rank": args.batch}
    loop_like = {"loss_sum": True, "fresh": True, "seed": True}
    runs = [(name, exchange, {}) for name, exchange in variants.items()]
    runs += [
        ("average+loss_sum", variants["average"], {"loss_sum": True}),
        ("average+fresh", variants["average"], {"fresh": True}),
        ("average+seed", variants["average"], {"seed": True}),
        ("average+all", variants["average"], loop_like),
        ("bf16+all", variants["bf16"], loop_like),
    ]
    for name, exchange, flags in runs:
        ms = timed_step(cfg, tc, group, exchange, args.batch, args.steps, **flags)
        out[name] = {
            "ms_per_step": round(ms, 2),
            "tokens_per_sec": round(world * args.batch * cfg.block_size / ms * 1000),
        }
    if group.rank() == 0:
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
