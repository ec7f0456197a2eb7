"""Train a preset on the real corpus with mlx_model alone (no Prefect) and report quality and speed.

    python bench/train_preset.py --preset seed --corpus PATH [--dtype bfloat16] [--out DIR]

Prints one JSON line: best and final estimated val loss, full-split val loss, training
tokens/s, ms/step, peak memory, device.
"""

# ruff: noqa: I001
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx_model  # noqa: E402,F401,I001  (must come before mlx.core: it preloads OpenBLAS)

import mlx.core as mx  # noqa: E402

from mlx_model.checkpoint import load_model  # noqa: E402
from mlx_model.config import get_preset  # noqa: E402
from mlx_model.data import Vocab, split_tokens  # noqa: E402
from mlx_model.evaluate import evaluate  # noqa: E402
from mlx_model.train import train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="seed")
    p.add_argument("--corpus", required=True)
    p.add_argument("--dtype", default=None, help="compute dtype override")
    p.add_argument("--max-iters", type=int, default=None)
    p.add_argument("--dropout", type=float, default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    preset = get_preset(args.preset)
    text = Path(args.corpus).read_text()
    vocab = Vocab.from_text(text)
    train_ids, val_ids = split_tokens(vocab.encode(text), 0.1)
    cfg = preset.model.replace(vocab_size=vocab.size)
    if args.dropout is not None:
        cfg = cfg.replace(dropout=args.dropout)
    tc = preset.train
    if args.dtype:
        tc = tc.replace(compute_dtype=args.dtype)
    if args.max_iters:
        tc = tc.replace(max_iters=args.max_iters)
    out = Path(args.out or tempfile.mkdtemp())
    mx.reset_peak_memory()

    def report(pr):
        if pr.kind == "eval":
            print(
                f"step {pr.step} train {pr.train_loss:.4f} val {pr.val_loss:.4f} "
                f"{pr.tokens_per_sec:.0f} tok/s",
                flush=True,
            )

    t0 = time.perf_counter()
    result = train(cfg, tc, train_ids, val_ids, out, callback=report)
    seconds = time.perf_counter() - t0
    full = evaluate(load_model(out / "best"), val_ids)
    tokens = tc.max_iters * tc.batch_size * cfg.block_size
    print(
        json.dumps(
            {
                "preset": args.preset,
                "device": str(mx.default_device()),
                "dtype": tc.compute_dtype,
                "dropout": cfg.dropout,
                "max_iters": tc.max_iters,
                "train_tokens": tokens,
                "best_est_val_loss": round(result.best_val_loss, 4),
                "best_step": result.best_step,
                "full_val_loss": round(full["val_loss"], 4),
                "seconds": round(seconds, 1),
                "tokens_per_sec_last_interval": round(result.tokens_per_sec),
                "tokens_per_sec_overall": round(tokens / seconds),
                "ms_per_step_overall": round(1000 * seconds / tc.max_iters, 2),
                "peak_memory_mb": round(mx.get_peak_memory() / 2**20, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
