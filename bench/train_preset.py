"""Train a preset on the real corpus with mlx_model alone (no Prefect) and report quality and speed.

    python bench/train_preset.py --preset seed --corpus PATH [--set FIELD=VALUE ...] [--out DIR]

`--set` overrides any GPTConfig or TrainConfig field (dropout=0.0, learning_rate=2e-3,
compute_dtype=bfloat16, eval_interval=100 ...); `--stop-after N` ends the run at step N
without changing the schedule.

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
import numpy as np  # noqa: E402

from mlx_model.checkpoint import load_model  # noqa: E402
from mlx_model.config import DataConfig, get_preset  # noqa: E402
from mlx_model.data import Vocab, split_tokens  # noqa: E402
from mlx_model.evaluate import evaluate  # noqa: E402
from mlx_model.config import ParallelConfig  # noqa: E402
from mlx_model.data import write_tokens  # noqa: E402
from mlx_model.distributed import train_distributed  # noqa: E402
from mlx_model.train import train  # noqa: E402

H100_BF16_FLOPS = 989e12  # dense bfloat16 peak of an H100 SXM


def flops_per_token(cfg) -> float:
    """6N (N without the position embedding) plus attention, as nanoGPT estimates it."""
    c, v = cfg, cfg.vocab_size
    n = v * c.n_emb + c.n_layer * (12 * c.n_emb * c.n_emb + 13 * c.n_emb) + 2 * c.n_emb
    return 6 * n + 12 * c.n_layer * c.n_emb * c.block_size


def corpus_splits(path: str | Path) -> tuple[Vocab, np.ndarray, np.ndarray]:
    """The corpus at `path`: its character vocabulary and its train and validation token
    splits, held out as the pipeline holds them out (`DataConfig.val_fraction`)."""
    text = Path(path).read_text()
    vocab = Vocab.from_text(text)
    return (vocab, *split_tokens(vocab.encode(text), DataConfig().val_fraction))


def add_set_option(p: argparse.ArgumentParser) -> None:
    """The repeatable `--set FIELD=VALUE` option that `apply_sets` reads."""
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a field (a bare GPTConfig or TrainConfig name: dropout=0.1)",
    )


def apply_sets(cfg, tc, items: list[str]):
    """(cfg, tc) with each FIELD=VALUE of `items` applied to whichever holds FIELD, a bare
    GPTConfig or TrainConfig field name (VALUE as JSON, else the bare word: a dtype, an
    optimizer name). Raises ValueError naming the item: no `=`, an unknown field, a value
    of the wrong type, or one the configuration refuses."""
    for item in items:
        name, eq, raw = item.partition("=")
        if not eq:
            raise ValueError(f"--set {item!r}: expected FIELD=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:  # a bare word: a dtype, an optimizer name
            value = raw
        target = cfg if name in cfg.to_dict() else tc if name in tc.to_dict() else None
        if target is None:
            raise ValueError(
                f"--set {item!r}: unknown field {name!r} (a bare field name of GPTConfig or "
                "TrainConfig: dropout, learning_rate, ...)"
            )
        current = target.to_dict()[name]
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(current, bool) or not isinstance(current, (int, float)):
            fits = type(value) is type(current)
        else:  # a float field takes an integer; an integer field only an integer
            fits = number and (isinstance(current, float) or isinstance(value, int))
        if not fits:
            kind = type(current).__name__
            article = "an" if kind == "int" else "a"
            raise ValueError(f"--set {item!r}: {name} takes {article} {kind}")
        try:
            target = target.replace(**{name: value})
        except ValueError as err:
            raise ValueError(f"--set {item!r}: {err}") from None
        cfg, tc = (target, tc) if name in cfg.to_dict() else (cfg, target)
    return cfg, tc


def main() -> None:
    p = argparse.ArgumentParser(
        description="One preset trained with mlx_model alone (no Prefect), on any device: "
        "its losses, tokens/s, ms/step and the first estimate at or below --target."
    )
    p.add_argument("--preset", default="seed")
    p.add_argument("--corpus", required=True, help="Tiny Shakespeare's input.txt")
    add_set_option(p)
    p.add_argument("--stop-after", type=int, default=None, help="end at this step")
    p.add_argument("--out", default=None, help="checkpoint folder (default: a temp dir)")
    p.add_argument("--processes", type=int, default=1, help="data-parallel ranks (mlx.launch)")
    p.add_argument(
        "--target", type=float, default=1.47, help="report the first estimate at or below"
    )
    p.add_argument(
        "--every-log", action="store_true", help="print each log interval: step, seconds, tok/s"
    )
    args = p.parse_args()
    try:
        preset = get_preset(args.preset)
    except ValueError as err:
        p.error(str(err))
    vocab, train_ids, val_ids = corpus_splits(args.corpus)
    cfg = preset.model.replace(vocab_size=vocab.size)
    try:
        cfg, tc = apply_sets(cfg, preset.train, args.set)
    except ValueError as err:
        p.error(str(err))
    out = Path(args.out or tempfile.mkdtemp())
    mx.reset_peak_memory()

    def report(pr):
        if pr.kind == "log" and args.every_log:
            print(f"log {pr.step} {pr.elapsed:.3f} s {pr.tokens_per_sec:.0f} tok/s", flush=True)
        if pr.kind == "eval":
            print(
                f"step {pr.step} train {pr.train_loss:.4f} val {pr.val_loss:.4f} "
                f"{pr.tokens_per_sec:.0f} tok/s",
                flush=True,
            )

    t0 = time.perf_counter()
    if args.processes > 1:
        paths = []
        for name, ids in (("train", train_ids), ("val", val_ids)):
            paths.append(out / f"{name}.arrow")
            write_tokens(paths[-1], ids, {})
        parallel = ParallelConfig(processes=args.processes, backend="auto")
        result = train_distributed(
            cfg, tc, parallel, *paths, out / "run", callback=report, stop_after=args.stop_after
        )
        out = out / "run"
    else:
        result = train(
            cfg, tc, train_ids, val_ids, out, callback=report, stop_after=args.stop_after
        )
    seconds = time.perf_counter() - t0
    full = evaluate(load_model(out / "best"), val_ids) if result.best_step > 0 else None
    steps = result.final_step
    tokens = steps * tc.batch_size * cfg.block_size
    print(
        json.dumps(
            {
                "preset": args.preset,
                "device": str(mx.default_device()),
                "dtype": tc.compute_dtype,
                "dropout": cfg.dropout,
                "overrides": args.set,
                "steps": steps,
                "max_iters": tc.max_iters,
                "train_tokens": tokens,
                "best_est_val_loss": round(result.best_val_loss, 4),
                "best_step": result.best_step,
                "full_val_loss": round(full["val_loss"], 4) if full else None,
                "seconds": round(seconds, 1),
                "tokens_per_sec_last_interval": round(result.tokens_per_sec),
                "tokens_per_sec_overall": round(tokens / seconds),
                "ms_per_step_overall": round(1000 * seconds / steps, 2),
                "peak_memory_mb": round(mx.get_peak_memory() / 2**20, 1),
                "processes": args.processes,
                "global_batch": tc.batch_size,
                "stopped_early": result.stopped_early,
                "loop_seconds": result.seconds,
                "mfu_last_interval": round(  # per GPU: the group's tokens over its GPUs
                    result.tokens_per_sec
                    * flops_per_token(cfg)
                    / (H100_BF16_FLOPS * args.processes),
                    3,
                ),
                "target": args.target,
                "first_at_target": next(
                    (
                        {k: round(v, 4) for k, v in h.items()}
                        for h in result.history
                        if h["val_loss"] <= args.target
                    ),
                    None,
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
