# ruff: noqa: I001
"""A training step's time by op, forward + backward, on the CPU: MLX's built-in kernels
("before") against the multiply-add versions in mlx_model.fastops ("after").

    python bench/step_profile.py --preset seed

Each op runs alone, compiled, at the preset's shapes (batch x context x width), forward
and backward (the gradient of a sum), median of `--repeat` runs; the "per step" column
multiplies by how often the op occurs in one step (e.g. once per layer).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx_model  # noqa: E402,F401,I001  (must come before mlx.core: it preloads OpenBLAS)

import mlx.core as mx  # noqa: E402
import mlx.nn as nn  # noqa: E402

from mlx_model import fastops  # noqa: E402
from mlx_model.config import get_preset  # noqa: E402
from mlx_model.model import GPT  # noqa: E402
from mlx_model.train import make_optimizer  # noqa: E402


def timed(fn, args, repeat: int) -> float:
    grad = mx.compile(
        mx.value_and_grad(lambda *a: fn(*a).astype(mx.float32).sum(), list(range(len(args))))
    )
    for _ in range(2):
        mx.eval(grad(*args))
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        mx.eval(grad(*args))
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def builtin_attention(q, k, v, scale):
    T = q.shape[2]
    mask = mx.arange(T)[None, :] > mx.arange(T)[:, None]
    s = mx.where(mask, -mx.inf, (q * scale) @ k.transpose(0, 1, 3, 2))
    return mx.softmax(s, axis=-1, precise=True) @ v


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="seed")
    p.add_argument("--repeat", type=int, default=10)
    args = p.parse_args()
    cfg = get_preset(args.preset).model
    tc = get_preset(args.preset).train
    B, T, C, H, L = tc.batch_size, cfg.block_size, cfg.n_emb, cfg.n_head, cfg.n_layer
    D = C // H
    r = mx.random.normal
    x, h4 = r((B, T, C)), r((B, T, 4 * C))
    q, k, v = r((B, H, T, D)), r((B, H, T, D)), r((B, H, T, D))
    w_attn, w_proj, w_fc, w_fc2 = r((3 * C, C)), r((C, C)), r((4 * C, C)), r((C, 4 * C))
    g, b = mx.ones((C,)), mx.zeros((C,))
    wte, wpe = r((cfg.vocab_size, C)), r((T, C))
    idx = mx.random.randint(0, cfg.vocab_size, (B, T))
    y = mx.random.randint(0, cfg.vocab_size, (B, T))
    scale = 1 / math.sqrt(D)
    mx.eval(x, h4, q, k, v, w_attn, w_proj, w_fc, w_fc2, wte, wpe, idx, y)
    drop = nn.Dropout(cfg.dropout)

    ops = [
        # name, count per step, before (fn, args), after (fn, args)
        ("embeddings (gather)", 1, (lambda a, c: a[idx] + c[:T], (wte, wpe)), None),
        ("layer norm", 2 * L + 1, (lambda a: mx.fast.layer_norm(a, g, b, 1e-5), (x,)), None),
        ("qkv projection (matmul)", L, (lambda a, w: a @ w.T, (x, w_attn)), None),
        (
            "causal attention core",
            L,
            (lambda a, b_, c: builtin_attention(a, b_, c, scale), (q, k, v)),
            (lambda a, b_, c: fastops.causal_attention(a, b_, c, scale), (q, k, v)),
        ),
        (
            "attention weights + dropout (training)",
            L,
            (lambda a, b_, c: drop(mx.softmax(_masked(a, b_, scale), axis=-1)) @ c, (q, k, v)),
            (lambda a, b_, c: drop(fastops.causal_weights(a, b_, scale)) @ c, (q, k, v)),
        ),
        ("attention out projection (matmul)", L, (lambda a, w: a @ w.T, (x, w_proj)), None),
        ("MLP up (matmul)", L, (lambda a, w: a @ w.T, (x, w_fc)), None),
        ("GELU (tanh)", L, (nn.gelu_approx, (h4,)), (fastops.gelu, (h4,))),
        ("MLP down (matmul)", L, (lambda a, w: a @ w.T, (h4, w_fc2)), None),
        (
            "LM head + cross-entropy",
            1,
            (lambda a, w: nn.losses.cross_entropy(a @ w.T, y), (x, wte)),
            None,
        ),
    ]
    drop.train()
    rows = []
    for name, count, before, after in ops:
        t_before = timed(*before, args.repeat)
        t_after = timed(*after, args.repeat) if after else t_before
        rows.append(
            {
                "op": name,
                "per_step": count,
                "before_ms": round(t_before, 2),
                "after_ms": round(t_after, 2),
                "before_step_ms": round(t_before * count, 1),
                "after_step_ms": round(t_after * count, 1),
            }
        )
    # the optimizer update over the whole model
    model = GPT(cfg.replace(vocab_size=65))
    opt = make_optimizer(tc)
    opt.init(model.trainable_parameters())
    grads = model.trainable_parameters()
    mx.eval(model.parameters(), opt.state)

    def update():
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)

    update()
    t = time.perf_counter()
    for _ in range(args.repeat):
        update()
    upd = 1000 * (time.perf_counter() - t) / args.repeat
    rows.append({"op": "AdamW update (eager)", "per_step": 1, "before_ms": round(upd, 2),
                 "after_ms": round(upd, 2), "before_step_ms": round(upd, 1),
                 "after_step_ms": round(upd, 1)})  # fmt: skip
    print("| op | per step | before ms | after ms | before ms/step | after ms/step |")
    print("| --- | --- | --- | --- | --- | --- |")
    for row in rows:
        print("| " + " | ".join(str(v) for v in row.values()) + " |")
    total_before = sum(r["before_step_ms"] for r in rows)
    total_after = sum(r["after_step_ms"] for r in rows)
    print(json.dumps({"preset": args.preset, "sum_before_ms": round(total_before, 1),
                      "sum_after_ms": round(total_after, 1)}))  # fmt: skip


def _masked(q, k, scale):
    T = q.shape[2]
    mask = mx.arange(T)[None, :] > mx.arange(T)[:, None]
    return mx.where(mask, -mx.inf, (q * scale) @ k.transpose(0, 1, 3, 2))


if __name__ == "__main__":
    main()
