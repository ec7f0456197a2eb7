# ruff: noqa: I001
"""Each rank's own timeline through a data-parallel run of the real training loop.

    mlx.launch -n 2 --backend nccl -- python bench/dp_probe.py --corpus input.txt --out DIR

Every rank records wall-clock times (one clock: the ranks share a host) at its start,
after its imports, after encoding the corpus, after `mx.distributed.init()`, at the
loop's entry, and when it asks for each step's batch (the loop reads the mean loss back
every `log_interval` steps, so the batch of step k*log_interval + 1 is asked for just
after the steps before it are done), then writes `DIR/probe-rank<r>.json`. The layout is
`bench/gpu_dp_warm.sh`'s: the preset's batch per rank, estimates every 100/N steps, 100 steps.
Tells start-up that one rank pays while another waits (skew) from start-up in the loop.
"""

from __future__ import annotations

import time

T_START = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx_model  # noqa: E402,F401  (must come before mlx.core)

import mlx.core as mx  # noqa: E402

import mlx_model.train as training  # noqa: E402
from mlx_model.config import get_preset  # noqa: E402
from mlx_model.data import Vocab, split_tokens  # noqa: E402


def main() -> None:
    marks = {"start": T_START, "imports": time.time()}
    p = argparse.ArgumentParser()
    p.add_argument("--corpus", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--log-interval", type=int, default=5)
    p.add_argument("--preset", default="nanogpt-char")
    args = p.parse_args()
    text = Path(args.corpus).read_text()
    vocab = Vocab.from_text(text)
    train_ids, val_ids = split_tokens(vocab.encode(text), 0.1)
    marks["corpus"] = time.time()
    group = mx.distributed.init()
    world, rank = group.size(), group.rank()
    marks["init"] = time.time()
    preset = get_preset(args.preset)
    cfg = preset.model.replace(vocab_size=vocab.size)
    lr = {1: preset.train.learning_rate, 2: 1.4e-3}.get(world, 2e-3)
    tc = preset.train.replace(
        batch_size=preset.train.batch_size * world, max_iters=5000 // world,
        eval_interval=100 // world, learning_rate=lr, min_lr=lr / 10,
        log_interval=args.log_interval,
    )  # fmt: skip
    asked: list[tuple[int, float]] = []
    real = training.train_batch

    def batch(ids, block, size, seed, step):
        asked.append((step, time.time()))
        return real(ids, block, size, seed, step)

    training.train_batch = batch
    marks["loop entry"] = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        result = training.train(cfg, tc, train_ids, val_ids, Path(tmp), stop_after=args.steps)
    marks["loop exit"] = time.time()
    out = {
        "rank": rank,
        "world": world,
        "device": str(mx.default_device()),
        "marks": marks,
        "batch_asked": asked,
        "seconds": result.seconds,
        "history": result.history,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"probe-rank{rank}.json").write_text(json.dumps(out))
    base = marks["start"]
    steps = {s: round(t - marks["loop entry"], 3) for s, t in asked if s % args.log_interval == 0}
    print(
        json.dumps(
            {
                "rank": rank,
                "since_start_s": {k: round(v - base, 3) for k, v in marks.items()},
                "loop_s_at_batch_of_step": steps,
                "loop_seconds": result.seconds,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
