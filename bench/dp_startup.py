# ruff: noqa: I001
"""What a data-parallel run spends before its steps settle, phase by phase, on each rank.

    mlx.launch -n 2 --backend nccl -- python bench/dp_startup.py --preset nanogpt-char
    python bench/dp_startup.py --preset nanogpt-char          # one process, for comparison

Phases (seconds, rank 0's, then the mean over ranks): `init` (mx.distributed.init), `first
all_sum` and `second all_sum` of one float (the first creates the communicator), `model`
(build and initialise), then the compiled training step (`mlx_model.train.make_step`)
at the preset's batch per rank: `step 1` (tracing, compiling, first run), `steps 2-10`,
`steps 11-60` (per step). Then, in the same warmed process, the training loop itself
(`mlx_model.train.train`, random tokens, 50 steps, a log every 5, no estimate before step
50): the seconds since the loop began at each log, to tell the loop's own start-up from
the group's and the compiler's. Three JSON lines from rank 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx_model  # noqa: E402,F401,I001  (must come before mlx.core)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_model.config import get_preset  # noqa: E402
from mlx_model.model import GPT  # noqa: E402
from mlx_model.train import DTYPES, make_optimizer, make_step, train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="nanogpt-char")
    args = p.parse_args()
    preset = get_preset(args.preset)
    cfg, tc = preset.model.replace(vocab_size=65), preset.train
    phases: dict[str, float] = {}
    t = time.perf_counter()

    def mark(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        phases[name] = now - t
        t = now

    group = mx.distributed.init()
    mark("init")
    for name in ("first all_sum", "second all_sum"):
        mx.eval(mx.distributed.all_sum(mx.ones((1,)), group=group))
        mark(name)
    mx.random.seed(0)
    model = GPT(cfg)
    model.train()
    optimizer = make_optimizer(tc)
    optimizer.init(model.trainable_parameters())
    mx.eval(model.parameters(), optimizer.state)
    mark("model")
    step = make_step(model, optimizer, tc, DTYPES[tc.compute_dtype], group)
    rng = np.random.default_rng(group.rank())
    x = mx.array(rng.integers(0, cfg.vocab_size, (tc.batch_size, cfg.block_size)), mx.int32)

    def run(n: int) -> None:
        for _ in range(n):
            loss = step(x, x)
            mx.async_eval(loss, model.parameters(), optimizer.state)
        mx.eval(loss)

    for name, n in (("step 1", 1), ("steps 2-10", 9), ("steps 11-60 per step", 50)):
        run(n)
        mark(name)
    phases["steps 11-60 per step"] /= 50
    out = {"preset": args.preset, "world": group.size(), "device": str(mx.default_device())}
    if group.rank() == 0:  # printed before any further collective, in case one hangs
        print(json.dumps({**out, "rank0_s": {k: round(v, 4) for k, v in phases.items()}}))
    mine = mx.array(list(phases.values()))
    mean = mx.distributed.all_sum(mine, group=group) / group.size()
    mx.eval(mean)  # on every rank: a collective needs them all
    if group.rank() == 0:
        means = (round(v, 4) for v in mean.tolist())
        print(json.dumps({**out, "mean_over_ranks_s": dict(zip(phases, means, strict=True))}))
    loop_tc = tc.replace(
        batch_size=tc.batch_size * group.size(), max_iters=50, log_interval=5,
        eval_interval=50, eval_batches=2, checkpoint_interval=50, patience=0,
    )  # fmt: skip
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, 1_000_000).astype(np.uint16)
    logs: list[tuple[int, float]] = []
    t = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:  # each rank its own; only rank 0 writes
        train(
            cfg, loop_tc, ids, ids, Path(tmp), callback=lambda p: logs.append((p.step, p.elapsed))
        )
    if group.rank() == 0:
        loop = {"loop_elapsed_s_at_step": {s: round(e, 3) for s, e in logs}}
        print(json.dumps({**out, **loop, "train_call_s": round(time.perf_counter() - t, 3)}))


if __name__ == "__main__":
    main()
