"""GPUs: how the training loop's throughput scales over 1..N GPUs of one machine.

    python bench/gpu_scaling.py --corpus input.txt [--gpus 1,2,4] [--rounds 3] [--out logs]

Weak scaling of nanogpt-char's loop: 64 sequences per GPU (global batch 64 N), data-parallel
through `mlx.launch` (NCCL), `--steps` steps with no loss estimate in between, each log
interval of 50 steps printed (`bench/train_preset.py --processes N --every-log`). A layout's
throughput is the median of its intervals after the first (which holds the compilation);
its speed-up is that over the 1-GPU run of the same round. Layouts alternate within each
round; the first round also fills MLX's kernel cache for every layout (a data-parallel step
fuses other kernels than one GPU's), so read the later rounds.

Prints a line per run, then one JSON line: every run and, per layout, the speed-up range.
`--smoke` checks the plumbing on the CPU: the `tiny` preset on 1 and 2 processes (MLX's ring
backend), a few steps.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_race import doc_parser, steady_tokens_per_sec, timed_lines  # noqa: E402

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = doc_parser(__doc__)
    p.add_argument("--corpus", required=True, help="Tiny Shakespeare's input.txt")
    p.add_argument("--gpus", default="1,2", help="GPU counts, comma-separated (default 1,2)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over the layouts (default 3)")
    p.add_argument("--steps", type=int, default=400, help="steps per run (default 400)")
    p.add_argument("--per-gpu-batch", type=int, default=64, help="sequences per GPU (default 64)")
    p.add_argument("--preset", default=None, help="default nanogpt-char (tiny with --smoke)")
    p.add_argument("--out", default=None, help="folder for the logs (default: a new temp dir)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per run (default 300)")
    p.add_argument("--smoke", action="store_true", help="check the plumbing on the CPU")
    args = p.parse_args(argv)
    try:
        args.gpus = [int(n) for n in args.gpus.split(",")]
    except ValueError:
        p.error(f"--gpus must be whole numbers separated by commas, got {args.gpus!r}")
    if not args.gpus or min(args.gpus) < 1:
        p.error(f"--gpus must be whole numbers >= 1, got {args.gpus}")
    if args.rounds < 1 or args.steps < 1:
        p.error("--rounds and --steps must be >= 1")
    if not Path(args.corpus).is_file():
        p.error(f"--corpus: no such file: {args.corpus}")
    args.preset = args.preset or ("tiny" if args.smoke else "nanogpt-char")
    return args


def command(args, n: int) -> list[str]:
    """The preset's own schedule (MLX writes its numbers into fused kernels), stopped."""
    cmd = [
        sys.executable, str(HERE / "train_preset.py"), "--corpus", args.corpus,
        "--preset", args.preset, "--processes", str(n), "--every-log",
        "--set", f"batch_size={args.per_gpu_batch * n}", "--set", "eval_interval=1000",
        "--stop-after", str(args.steps),
    ]  # fmt: skip
    return cmd + (["--set", "log_interval=5"] if args.smoke else [])


def speedups(runs: list[dict]) -> dict[int, list[float]]:
    """Per GPU count, its tok/s over the 1-GPU run's in the same round (rounds after the
    first, which compiles; all rounds if there is only one)."""
    later = [r for r in runs if r["round"] > 1] or runs
    one = {r["round"]: r["tokens_per_sec"] for r in later if r["gpus"] == 1}
    out: dict[int, list[float]] = {}
    for r in later:
        base = one.get(r["round"])
        if r["gpus"] != 1 and base and r["tokens_per_sec"]:
            out.setdefault(r["gpus"], []).append(round(r["tokens_per_sec"] / base, 3))
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu-scaling-"))
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    runs = []
    for rnd in range(1, args.rounds + 1):
        for n in args.gpus:
            log = out / f"scaling-{n}-{rnd}.log"
            rc, lines = timed_lines(command(args, n), env, args.timeout, log)
            tps = steady_tokens_per_sec([line for _, line in lines])
            runs.append({"gpus": n, "round": rnd, "rc": rc, "tokens_per_sec": tps, "log": str(log)})
            print(f"{n} GPU(s), round {rnd}: rc {rc}, {tps} tok/s", flush=True)
    report = {
        "preset": args.preset,
        "per_gpu_batch": args.per_gpu_batch,
        "steps": args.steps,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "speedup_over_1_gpu": speedups(runs),
        "runs": runs,
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
