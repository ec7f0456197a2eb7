"""GPU: where a training step's time goes, kernel by kernel, and its ms per step.

    python bench/gpu_profile.py [--preset nanogpt-char-fast] [--set FIELD=VALUE]
        [--ops auto] [--steps 100] [--rounds 3] [--top 30] [--out profile.txt]

One process builds the preset's compiled training step (`mlx_model.train.make_step`) on
random token windows of the preset's batch shape, runs 10 steps unmeasured, times
`--rounds` rounds of `--steps` steps, then records `--profile-steps` steps with PyTorch's
profiler, whose CUPTI tracing sees every kernel of the process, MLX's included. The timing
comes first: once CUPTI is attached the steps run slower (12 ms became 14 to 19 ms on an
H200), and kernel times under it add up to more than the step's wall time, so read the
table's shares, not its milliseconds.

Prints ms/step per round; then the kernels by GPU time per step, with launches per step
and a group (matmul, fused element-wise: MLX's compiled kernels, element-wise, reduction,
copy, random bits, normalisation and softmax, gather/scatter, memset, other); then the
groups' totals. `--out` keeps the whole table. `--ops` picks the ops backend
(`mlx_model.ops`), for comparing one against another in separate calls.

A cold kernel cache compiles the step first (about two minutes for nanogpt-char-fast on an
H200); the printed first-step time says so. `--smoke` times the `tiny` preset on the CPU
and skips the profile.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from gpu_race import doc_parser  # noqa: E402

GROUPS = (  # (group, substrings of a kernel's name), first match wins
    ("matmul", ("nvjet", "gemm", "cublas", "cutlass", "splitKreduce")),
    ("random bits", ("rbits",)),
    ("normalisation and softmax", ("layer_norm", "rms_norm", "softmax")),
    ("reduction", ("reduce",)),
    ("copy", ("copy",)),
    ("gather/scatter", ("gather", "scatter")),
    ("memset", ("Memset",)),
    ("element-wise", ("unary_", "binary_", "ternary_", "arange")),
    ("fused element-wise", ("_contiguous<", "_strided<")),
)


def kernel_group(name: str) -> str:
    """The group a GPU kernel's name belongs to (see GROUPS), else "other"."""
    for group, keys in GROUPS:
        if any(k in name for k in keys):
            return group
    return "other"


def per_step(rows: list[tuple[str, float, int]], steps: int) -> list[dict]:
    """Kernels (name, total GPU time in microseconds, launches) over `steps` steps ->
    one dict per kernel: ms and launches per step, and its group; by time, largest
    first. Rows with no GPU time (host API calls) are left out."""
    out = [
        {
            "kernel": name,
            "ms_per_step": us / steps / 1000,
            "launches_per_step": n / steps,
            "group": kernel_group(name),
        }
        for name, us, n in rows
        if us > 0
    ]
    return sorted(out, key=lambda r: r["ms_per_step"], reverse=True)


def group_totals(kernels: list[dict]) -> dict[str, dict[str, float]]:
    """ms and launches per step summed per group, largest first."""
    totals: dict[str, dict[str, float]] = defaultdict(lambda: {"ms": 0.0, "launches": 0.0})
    for k in kernels:
        totals[k["group"]]["ms"] += k["ms_per_step"]
        totals[k["group"]]["launches"] += k["launches_per_step"]
    return dict(sorted(totals.items(), key=lambda kv: kv[1]["ms"], reverse=True))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from train_preset import add_set_option, apply_sets  # imports MLX (after mlx_model)

    p = doc_parser(__doc__)
    p.add_argument("--preset", default=None, help="default nanogpt-char-fast (--smoke: tiny)")
    add_set_option(p)
    p.add_argument("--ops", default="auto", help="ops backend (mlx_model.ops), default auto")
    p.add_argument("--steps", type=int, default=100, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=3, help="timed rounds")
    p.add_argument("--profile-steps", type=int, default=20, help="steps under the profiler")
    p.add_argument("--top", type=int, default=30, help="kernels printed")
    p.add_argument("--out", default=None, help="file for the whole per-kernel table")
    p.add_argument("--smoke", action="store_true", help="the tiny preset on the CPU, no profile")
    args = p.parse_args(argv)
    for name in ("steps", "rounds", "profile_steps", "top"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    args.preset = args.preset or ("tiny" if args.smoke else "nanogpt-char-fast")
    import mlx.core as mx  # after mlx_model (train_preset imported it): BLAS, kernel cache

    from mlx_model import ops
    from mlx_model.config import get_preset

    if not args.smoke and not mx.cuda.is_available():
        p.error("no GPU: MLX sees no CUDA device here (--smoke times the tiny preset on the CPU)")
    if args.ops not in ops.CHOICES:
        p.error(f"--ops {args.ops!r}: choose one of {', '.join(ops.CHOICES)}")
    try:
        preset = get_preset(args.preset)
        args.model, args.train = apply_sets(
            preset.model.replace(vocab_size=65), preset.train, args.set
        )
    except ValueError as err:
        p.error(str(err))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import mlx.core as mx
    import numpy as np

    from mlx_model import ops
    from mlx_model.model import GPT
    from mlx_model.train import DTYPES, make_optimizer, make_step

    if args.smoke:
        mx.set_default_device(mx.cpu)
    cfg, tc = args.model, args.train
    rng = np.random.default_rng(0)
    windows = rng.integers(0, cfg.vocab_size, (4, tc.batch_size, cfg.block_size + 1))
    batches = [(mx.array(w[:, :-1]), mx.array(w[:, 1:])) for w in windows.astype(np.int32)]
    with ops.use(args.ops):  # the whole time: a compiled step may trace again later
        mx.random.seed(tc.seed)
        model = GPT(cfg)
        model.train()
        optimizer = make_optimizer(tc)
        step = make_step(model, optimizer, tc, DTYPES[tc.compute_dtype])
        backend = ops.backend(DTYPES[tc.compute_dtype], True).name

        def run(i: int) -> mx.array:
            loss = step(*batches[i % len(batches)])
            mx.async_eval(loss, model.parameters(), optimizer.state)
            return loss

        t = time.perf_counter()
        mx.eval(run(0))
        first = time.perf_counter() - t
        for i in range(10):
            loss = run(i)
        mx.eval(loss)
        rounds = []
        for _ in range(args.rounds):
            t = time.perf_counter()
            for i in range(args.steps):
                loss = run(i)
            mx.eval(loss)
            rounds.append((time.perf_counter() - t) / args.steps * 1000)
        tokens = tc.batch_size * cfg.block_size
        print(
            f"{args.preset} on {mx.default_device()}, ops {backend}: first step {first:.1f} s; "
            f"ms/step {', '.join(f'{r:.2f}' for r in rounds)} "
            f"({tokens / max(rounds) * 1e3 / 1e6:.2f}M to {tokens / min(rounds) * 1e3 / 1e6:.2f}M "
            "tok/s)",
            flush=True,
        )
        report = {"preset": args.preset, "ops": backend, "ms_per_step": rounds, "first_s": first}
        if args.smoke:
            print(json.dumps(report))
            return report
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for i in range(args.profile_steps):
                loss = run(i)
            mx.eval(loss)
    rows = []
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        rows.append((event.key, us, event.count))
    kernels = per_step(rows, args.profile_steps)
    total = sum(k["ms_per_step"] for k in kernels)
    launches = sum(k["launches_per_step"] for k in kernels)
    print(f"under the profiler: {total:.2f} ms of kernels a step, {launches:.0f} launches")
    for k in kernels[: args.top]:
        share = k["ms_per_step"] / total
        print(
            f"{k['ms_per_step']:7.3f} ms {share:6.1%} {k['launches_per_step']:5.0f}x  "
            f"{k['group']:26} {k['kernel'][:100]}"
        )
    print("by group:")
    groups = group_totals(kernels)
    for group, t in groups.items():
        print(f"{t['ms']:7.3f} ms {t['ms'] / total:6.1%} {t['launches']:5.0f}x  {group}")
    if args.out:
        with open(args.out, "w") as f:
            for k in kernels:
                f.write(
                    f"{k['ms_per_step']:.4f}\t{k['launches_per_step']:.1f}\t{k['group']}\t"
                    f"{k['kernel']}\n"
                )
    report |= {"kernel_ms_per_step": total, "launches_per_step": launches, "groups": groups}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
