# ruff: noqa: I001
"""A training step's time by op, forward + backward, on the CPU, before and after.

    python bench/step_profile.py --preset seed

"Before": MLX's built-in kernels in one stream, OpenBLAS using every core.
"After": what the model runs now: the native primitives (mlx_model.ops.native: attention,
GELU, layer norm, the embeddings, cross-entropy) with the batch split
over one stream per core (`ops.split_batch`) where the model splits it, OpenBLAS
single-threaded in each lane. Attention, layer norm and GELU are also timed in their
pure-MLX forms (ops.cpu: the model's fallback when the kernels cannot be built).

Each op runs alone, compiled, at the preset's shapes (batch x context x width), forward
and backward (the gradient of a sum), median of `--repeat` runs; the "per step" column
multiplies by how often the op occurs in one step (e.g. once per layer). The last rows
time the whole compiled training step in lanes with and without the fused kernels,
alternating.
A second table gives each op's share of the real step by ablation (the step without it).
"""

from __future__ import annotations

import argparse
import ctypes
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
import numpy as np  # noqa: E402

from mlx_model import ops  # noqa: E402
from mlx_model.ops import cpu as fastops  # noqa: E402
from mlx_model.ops import native as _fused  # noqa: E402
from mlx_model.runtime import blas as _blas  # noqa: E402
from mlx_model.runtime.lanes import cpu_lanes  # noqa: E402
from mlx_model.config import get_preset  # noqa: E402
from mlx_model.data import train_batch  # noqa: E402
from mlx_model.model import GPT  # noqa: E402
from mlx_model.train import make_optimizer, make_step  # noqa: E402


def blas_threads(n: int) -> None:
    if _blas.loaded:
        lib = ctypes.CDLL(_blas.loaded)
        for name in ("scipy_openblas_set_num_threads", "openblas_set_num_threads"):
            if hasattr(lib, name):  # scipy-openblas32 prefixes its symbols
                getattr(lib, name)(n)
                break


def timed(fn, batched: tuple, shared: tuple, repeat: int, lanes: int) -> float:
    """Median ms of fn(*batched, *shared) forward + backward, batch rows over `lanes`."""
    n_b = len(batched)

    def total(*args):
        def lane(*b):
            return fn(*b, *args[n_b:]).astype(mx.float32).sum(keepdims=True)

        if n_b == 0:
            return lane().sum()
        return ops.split_batch(lane, lanes, *args[:n_b]).sum()

    args = (*batched, *shared)
    floats = [i for i, a in enumerate(args) if mx.issubdtype(a.dtype, mx.floating)]
    grad = mx.compile(mx.value_and_grad(total, floats))  # targets and ids get none
    for _ in range(2):
        mx.eval(grad(*args))
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        mx.eval(grad(*args))
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def builtin_attention(q, k, v, scale, drop=None):
    T = q.shape[2]
    mask = mx.arange(T)[None, :] > mx.arange(T)[:, None]
    w = mx.softmax(mx.where(mask, -mx.inf, (q * scale) @ k.transpose(0, 1, 3, 2)), axis=-1)
    return (drop(w) if drop else w) @ v


def split_heads(qkv, H):
    B, T, C3 = qkv.shape
    return (t.reshape(B, T, H, -1).transpose(0, 2, 1, 3) for t in mx.split(qkv, 3, axis=-1))


def merge_heads(y):
    B, H, T, D = y.shape
    return y.transpose(0, 2, 1, 3).reshape(B, T, H * D)


def step_ms(cfg, tc, lanes: int, fused: bool = True):
    """A function run(n) -> ms per step over n more steps of the compiled training step."""
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, 200_000).astype(np.uint16)
    mx.random.seed(0)
    model = GPT(cfg)
    opt = make_optimizer(tc)
    opt.init(model.trainable_parameters())
    model.train()
    step = make_step(model, opt, tc)
    i = 0

    def run(n: int) -> float:
        nonlocal i
        t = time.perf_counter()
        for _ in range(n):
            x, y = train_batch(ids, cfg.block_size, tc.batch_size, tc.seed, i)
            loss = step(mx.array(x), mx.array(y))
            mx.async_eval(loss, model.parameters(), opt.state)
            i += 1
        mx.eval(loss)
        return 1000 * (time.perf_counter() - t) / n

    with ops.use("native" if fused else "cpu", lanes):  # traced here: the choice sticks
        run(2)
    return run


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="seed")
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--steps", type=int, default=5, help="steps per whole-step round")
    p.add_argument("--rounds", type=int, default=3, help="whole-step rounds per side")
    args = p.parse_args()
    cfg = get_preset(args.preset).model.replace(vocab_size=65)
    tc = get_preset(args.preset).train
    B, T, C, H, L = tc.batch_size, cfg.block_size, cfg.n_emb, cfg.n_head, cfg.n_layer
    D = C // H
    lanes = cpu_lanes()
    r = mx.random.normal
    x, h4 = r((B, T, C)), r((B, T, 4 * C))
    qkv = r((B, T, 3 * C))
    w_attn, w_proj, w_fc, w_fc2 = r((3 * C, C)), r((C, C)), r((4 * C, C)), r((C, 4 * C))
    g, b = mx.ones((C,)), mx.zeros((C,))
    wte, wpe = r((cfg.vocab_size, C)), r((T, C))
    idx = mx.random.randint(0, cfg.vocab_size, (B, T)).astype(mx.int32)
    y = mx.random.randint(0, cfg.vocab_size, (B, T)).astype(mx.int32)
    scale = 1 / math.sqrt(D)
    mx.eval(x, h4, qkv, w_attn, w_proj, w_fc, w_fc2, wte, wpe, idx, y)
    drop = nn.Dropout(cfg.dropout)
    drop.train()

    def matmul(a, w):
        return a @ w.T

    def layer_norm(a):
        return mx.fast.layer_norm(a, g, b, 1e-5)

    def fast_ln(a):
        return fastops.layer_norm(a, g, b, 1e-5)

    def fused_ln(a):
        return ext.layer_norm(a, g, b, 1e-5)

    ext = _fused.load()
    if ext is None:
        sys.exit("the fused kernels did not build here (see the warning above)")

    def embed(a, c):
        return ext.embed(idx, a, c)

    def head_loss(a, t, w):
        return nn.losses.cross_entropy(a @ w.T, t, reduction="none")

    def fused_head_loss(a, t, w):
        return ext.cross_entropy(a @ w.T, t)

    def builtin(qkv):  # MLX's own ops, with the head split and merge the model does
        return merge_heads(builtin_attention(*split_heads(qkv, H), scale, drop))

    def blocked(qkv):  # fastops in query blocks: the model's pure-MLX fallback
        return merge_heads(fastops.causal_attention(*split_heads(qkv, H), scale, drop))

    def fused(qkv):
        return ext.causal_attention(qkv, fastops.dropout_seed(), H, scale, cfg.dropout)

    # name, count per step, before fn, after fn (None: same), batched args, shared args,
    # whether the model runs the op in lanes
    table = [
        ("embeddings", 1, lambda a, c: a[idx] + c[:T], embed, (), (wte, wpe), False),
        ("layer norm: pure MLX (fastops)", 2 * L + 1, layer_norm, fast_ln, (x,), (), True),
        ("layer norm: fused primitive", 2 * L + 1, layer_norm, fused_ln, (x,), (), True),
        ("qkv projection (matmul)", L, matmul, None, (x,), (w_attn,), True),
        ("attention + dropout: pure MLX in query blocks", L, builtin, blocked, (qkv,), (), True),
        ("attention + dropout: fused primitive", L, builtin, fused, (qkv,), (), True),
        ("attention out projection (matmul)", L, matmul, None, (x,), (w_proj,), True),
        ("MLP up (matmul)", L, matmul, None, (x,), (w_fc,), True),
        ("GELU: pure MLX (fastops)", L, nn.gelu_approx, fastops.gelu, (h4,), (), True),
        ("GELU: fused primitive", L, nn.gelu_approx, ext.gelu, (h4,), (), True),
        ("MLP down (matmul)", L, matmul, None, (h4,), (w_fc2,), True),
        ("LM head + cross-entropy", 1, head_loss, fused_head_loss, (x, y), (wte,), True),
    ]
    rows = []
    for name, count, before, after, batched, shared, laned in table:
        blas_threads(lanes)
        t_before = timed(before, batched, shared, args.repeat, 1)
        blas_threads(1 if lanes > 1 else lanes)
        t_after = timed(after or before, batched, shared, args.repeat, lanes if laned else 1)
        rows.append([name, count, t_before, t_after])
    # the optimizer update over the whole model, the same both ways
    model = GPT(cfg)
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
    rows.append(["AdamW update", 1, upd, upd])

    print(f"lanes: {lanes}")
    print("| op | per step | before ms | after ms | before ms/step | after ms/step |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, count, tb, ta in rows:
        print(f"| {name} | {count} | {tb:.2f} | {ta:.2f} | {tb * count:.1f} | {ta * count:.1f} |")
    summed = [r for r in rows if "pure MLX" not in r[0]]  # the model runs the fused ones
    total_before = sum(r[1] * r[2] for r in summed)
    total_after = sum(r[1] * r[3] for r in summed)
    print(f"| sum of the ops | | | | {total_before:.1f} | {total_after:.1f} |")

    # the whole step in lanes, with the fused kernels and with pure MLX, alternating.
    # (One lane against lanes is measured against PyTorch as the peer instead:
    # SHAKESPEARE_GPT_CPU_LANES=1 python bench/torch_vs_mlx.py. Switching OpenBLAS
    # between 1 and 2 threads inside one process disturbed the rounds that followed.)
    blas_threads(1 if lanes > 1 else lanes)
    runs = {"lanes": step_ms(cfg, tc, lanes), "lanes, pure MLX": step_ms(cfg, tc, lanes, False)}
    whole: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(args.rounds):
        for kind, run in runs.items():
            whole[kind].append(run(args.steps))
    med = {k: statistics.median(v) for k, v in whole.items()}
    print(
        f"| whole step, {lanes} lanes, pure MLX (no fused kernels) | 1 | | | "
        f"{med['lanes, pure MLX']:.1f} | |"
    )
    print(f"| whole step, {lanes} lanes | 1 | | | | {med['lanes']:.1f} |")

    # Each op's share of the real step, by ablation: the whole step with that op
    # replaced by a pass-through, against the full step, alternating rounds. Isolated
    # timings above miss how ops overlap across lanes; this does not.
    class Ablated:  # the fused kernels, with some replaced by pass-throughs
        def __init__(self, **overrides):
            self.overrides = overrides

        def __getattr__(self, name):
            return self.overrides.get(name) or getattr(ext, name)

    real_load = _fused.load
    ablations = {
        "full step": {},
        "GELU": {"gelu": lambda x: x * 1.0},
        "attention core + dropout": {
            "causal_attention": lambda qkv, seed, heads, scale, p: qkv[..., 2 * C :] * 1.0
        },
        "layer norms": {"layer_norm": lambda x, w, b, eps: x * 1.0},
        "dropout": {},
    }
    ablated_runs = {}
    for name, overrides in ablations.items():
        _fused.load = lambda overrides=overrides: Ablated(**overrides)
        ops._choose.cache_clear()
        dropout = 0.0 if name == "dropout" else cfg.dropout
        ablated_runs[name] = step_ms(cfg.replace(dropout=dropout), tc, lanes)
    _fused.load = real_load
    ops._choose.cache_clear()
    ablated: dict[str, list[float]] = {k: [] for k in ablated_runs}
    for _ in range(args.rounds):
        for name, run in ablated_runs.items():
            ablated[name].append(run(args.steps))
    full = statistics.median(ablated["full step"])
    print(f"\n| without ({lanes} lanes) | ms/step | share of the full step |")
    print("| --- | --- | --- |")
    for name, values in ablated.items():
        ms = statistics.median(values)
        share = "" if name == "full step" else f"{full - ms:.0f} ms ({(full - ms) / full:.0%})"
        print(f"| {name} | {ms:.0f} | {share} |")
    print(
        json.dumps(
            {
                "preset": args.preset,
                "lanes": lanes,
                "sum_before_ms": round(total_before, 1),
                "sum_after_ms": round(total_after, 1),
                "whole_step_ms": {k: [round(x) for x in v] for k, v in whole.items()},
                "ablation_ms": {k: [round(x) for x in v] for k, v in ablated.items()},
            }
        )
    )


if __name__ == "__main__":
    main()
