"""ms per training step of a preset at its own shape, compiled or op by op.

    python bench/step_time.py --preset nanogpt-char-fast [--uncompiled] [--steps 30]
        [--joined auto|yes|no] [--set FIELD=VALUE ...]

One process builds the preset's model, optimizer (`make_optimizer`: the ops backend
decides which unless `--joined` says: one update over all parameters, or MLX's
per-parameter optimizers) and training step (`make_step`) on one batch of random tokens, runs 5
steps, then times 3 rounds of `--steps` steps and prints one JSON line: the optimizer,
the ops backend, the first 5 steps' seconds (kernel compilation, on a cold cache), ms/step
and tok/s per round. `--uncompiled` turns MLX's compilation off (the step a GPU's first
run takes while its kernels compile). To compare two versions of the project, run it with
each checkout first on PYTHONPATH, alternating, in one session.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gpu_race import doc_parser  # noqa: E402
from train_preset import add_set_option, apply_sets  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    p = doc_parser(__doc__)
    p.add_argument("--preset", default="nanogpt-char-fast", help="a preset (mlx_model.config)")
    p.add_argument("--uncompiled", action="store_true", help="MLX's compilation off")
    p.add_argument("--steps", type=int, default=30, help="steps per timed round (default 30)")
    p.add_argument(
        "--joined",
        choices=("auto", "yes", "no"),
        default="auto",
        help="the joined optimizer: the backend's choice (auto), or yes/no",
    )
    add_set_option(p)
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")

    import mlx_model  # noqa: F401, I001  (before MLX: the kernel cache and the BLAS)
    import mlx.core as mx
    import numpy as np

    from mlx_model import ops
    from mlx_model.config import get_preset
    from mlx_model.model import GPT
    from mlx_model.train import DTYPES, make_optimizer, make_step

    try:
        preset = get_preset(args.preset)
    except ValueError as err:
        p.error(str(err))
    try:
        cfg, tc = apply_sets(preset.model.replace(vocab_size=65), preset.train, args.set)
    except ValueError as err:
        p.error(str(err))
    if args.uncompiled:
        mx.disable_compile()
    mx.random.seed(0)
    joined = {"auto": None, "yes": True, "no": False}[args.joined]
    model, optimizer = GPT(cfg), make_optimizer(tc, joined=joined)
    optimizer.init(model.trainable_parameters())
    model.train()
    dtype = DTYPES[tc.compute_dtype]
    step = make_step(model, optimizer, tc, dtype, compiled=not args.uncompiled)
    rng = np.random.default_rng(0)
    x = mx.array(rng.integers(0, 65, (tc.batch_size, cfg.block_size)), mx.int32)
    start = time.perf_counter()
    for _ in range(5):
        mx.eval(step(x, x), model.parameters(), optimizer.state)
    first = time.perf_counter() - start
    rounds = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(args.steps):
            mx.async_eval(step(x, x), model.parameters(), optimizer.state)
        mx.eval(model.parameters(), optimizer.state)
        rounds.append((time.perf_counter() - start) / args.steps * 1e3)
    tokens = tc.batch_size * cfg.block_size
    report = {
        "preset": args.preset,
        "set": args.set,
        "compiled": not args.uncompiled,
        "optimizer": type(optimizer).__name__,
        "backend": ops.backend(dtype, True).name,
        "device": str(mx.default_device()),
        "first5_s": round(first, 2),
        "ms_per_step": [round(r, 2) for r in rounds],
        "tok_s": [round(tokens / r * 1e3) for r in rounds],
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
