"""The sum of a (B, T, n) cotangent over B and T, a bias's gradient, in the forms MLX can
compute it: its time and its error.

    python bench/batch_sum.py [--batch 64] [--context 256] [--widths 384,1152,1536]
        [--dtype bfloat16] [--reps 200] [--rounds 3]

For each width n (nanogpt-char's: 384 for the projections back to the residual, 1152 for
c_attn, 1536 for c_fc), on random normal values: MLX's one reduction over both axes
(`sum01`, what autodiff does), the sum over T then over B (`sum1_sum0`,
`mlx_model.ops.gpu.batch_sum`), the same in float32, a product with a row of ones, and a
batched product then a sum. Each form is compiled (`mx.compile`) and timed over `--reps`
sums in `--rounds` rounds (ms a sum); its error is the largest difference from the float32
sum over both axes. Prints a line per form and width, then one JSON line. On MLX's CUDA
backend a sum of bfloat16 keeps its running sums in bfloat16 (`ReduceResult<Sum, T>`,
`mlx/backend/cuda/reduce/reduce_ops.cuh`, MLX 0.32), so the forms' errors differ there.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx_model  # noqa: E402, F401  (before MLX: the BLAS it binds)


def forms(batch: int, context: int) -> dict:
    import mlx.core as mx

    from mlx_model.ops.gpu import batch_sum

    rows = batch * context
    return {
        "sum01": lambda g: g.sum(axis=(0, 1)),
        "sum1_sum0": batch_sum,
        "f32_sum1_sum0": lambda g: g.astype(mx.float32).sum(axis=1).sum(axis=0).astype(g.dtype),
        "ones_matmul": lambda g: (mx.ones((1, rows), g.dtype) @ g.reshape(rows, -1)).reshape(-1),
        "ones_bmm_sum0": lambda g: (mx.ones((batch, 1, context), g.dtype) @ g).sum(axis=(0, 1)),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--widths", default="384,1152,1536", help="comma-separated n")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--reps", type=int, default=200, help="sums per round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    try:
        widths = [int(w) for w in args.widths.split(",")]
    except ValueError:
        p.error(f"--widths must be integers separated by commas, got {args.widths!r}")
    if min(args.batch, args.context, args.reps, args.rounds, *widths) < 1:
        p.error("--batch, --context, --widths, --reps and --rounds must be at least 1")
    import mlx.core as mx

    dtype = getattr(mx, args.dtype)
    results = {}
    for n in widths:
        gs = [mx.random.normal((args.batch, args.context, n)).astype(dtype) for _ in range(8)]
        mx.eval(gs)
        want = gs[0].astype(mx.float32).sum(axis=(0, 1))
        for name, form in forms(args.batch, args.context).items():
            fn = mx.compile(form)
            error = mx.abs(fn(gs[0]).astype(mx.float32) - want).max().item()
            mx.eval([fn(g) for g in gs])  # compiled and warm
            rounds = []
            for _ in range(args.rounds):
                t = time.perf_counter()
                pending = []
                for i in range(args.reps):
                    pending.append(fn(gs[i % len(gs)]))
                    if len(pending) == 25:
                        mx.eval(pending)
                        pending = []
                mx.eval(pending)
                rounds.append(round((time.perf_counter() - t) / args.reps * 1e3, 4))
            results[f"{n}:{name}"] = {"ms": rounds, "max_error": round(error, 4)}
            print(f"n={n:5d} {name:14s} ms a sum {rounds}, largest error {error:.3g}", flush=True)
    out = {"device": str(mx.default_device()), "dtype": args.dtype, "batch": args.batch,
           "context": args.context, "results": results}  # fmt: skip
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
