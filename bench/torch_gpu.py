# ruff: noqa: I001
"""The PyTorch reference for the GPU comparison: nanoGPT's way of training on the same
shape, the same batches and the same evaluation schedule as `mlx_model`.

    python bench/torch_gpu.py --preset nanogpt-char --corpus input.txt [--target 1.47]

`torch.compile`, bfloat16 autocast, fused AdamW (decay on matrices only), the preset's
warm-up + cosine schedule, gradient clipping; batches from `mlx_model.data.train_batch`
and loss estimates on `fixed_windows`, exactly the project's. Prints one JSON line:
steady tokens/s and ms/step (evaluation excluded), the estimated model FLOP utilisation,
and the wall time from the first step to the first estimate at or below `--target`; each
estimate is also printed as it is made (`step N train X val Y`, as `bench/train_preset.py`
prints them), which `bench/gpu_race.py` times from process start. `--device cpu
--no-compile` runs it without a GPU, to check the plumbing on a tiny preset.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mlx_model.config import get_preset  # noqa: E402
from mlx_model.data import fixed_windows, get_batch, train_batch  # noqa: E402
from torch_vs_mlx import torch_model  # noqa: E402
from train_preset import corpus_splits  # noqa: E402

H100_BF16_FLOPS = 989e12  # dense bfloat16 peak of an H100 SXM


IGNORED = -100  # a target that adds nothing to a loss (PyTorch's ignore_index)


def mean_window_loss(loss_sum, ids: np.ndarray, starts: np.ndarray, block: int, batch: int):
    """Mean next-token loss over the windows at `starts` (the project's `fixed_windows`: all
    of a split that holds no more than the estimate asks for), `batch` windows at a time.
    A short last batch is padded with IGNORED targets, so that every batch has the compiled
    shape; `loss_sum(x, y)` (int32 arrays (batch, block)) sums the loss of the others."""
    total = 0.0
    for i in range(0, len(starts), batch):
        x, y = get_batch(ids, starts[i : i + batch], block)
        pad = ((0, batch - len(x)), (0, 0))
        total = total + loss_sum(np.pad(x, pad), np.pad(y, pad, constant_values=IGNORED))
    return float(total) / (len(starts) * block)


def flops_per_token(cfg, n_params: int) -> float:
    """6N for the matrices plus the attention scores and values (nanoGPT's estimate)."""
    return 6 * n_params + 12 * cfg.n_layer * cfg.n_emb * cfg.block_size


def lr_at(tc, step: int) -> float:
    if step < tc.warmup_iters:
        return tc.learning_rate * step / tc.warmup_iters
    t = (step - tc.warmup_iters) / max(tc.max_iters - tc.warmup_iters, 1)
    return tc.min_lr + 0.5 * (tc.learning_rate - tc.min_lr) * (1 + math.cos(math.pi * t))


def main() -> None:
    p = argparse.ArgumentParser(description="The PyTorch reference: nanoGPT's recipe on a GPU.")
    p.add_argument("--preset", default="nanogpt-char")
    p.add_argument("--corpus", required=True)
    p.add_argument("--target", type=float, default=1.47)
    p.add_argument("--max-iters", type=int, default=None)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (a plumbing check)")
    p.add_argument("--no-compile", action="store_true", help="eager mode, no torch.compile")
    args = p.parse_args()
    preset = get_preset(args.preset)
    vocab, train_ids, val_ids = corpus_splits(args.corpus)
    cfg, tc = preset.model.replace(vocab_size=vocab.size), preset.train
    max_iters = args.max_iters or tc.max_iters
    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    torch.manual_seed(tc.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    model = torch_model(cfg).to(dev)
    n_params = sum(p.numel() for p in model.parameters()) - model.wpe.weight.numel()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": tc.weight_decay},
        {"params": other, "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW(groups, lr=tc.learning_rate, betas=(tc.beta1, tc.beta2), fused=True)
    compiled = model if args.no_compile else torch.compile(model)

    def loss_of(x, y, reduction="mean"):
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            logits, _ = compiled(x)
        flat = logits.float().view(-1, logits.size(-1))
        return F.cross_entropy(flat, y.view(-1), reduction=reduction, ignore_index=IGNORED)

    def to_device(x, y):
        pinned = (torch.from_numpy(a.astype(np.int64)) for a in (x, y))
        return (t.pin_memory().to(dev, non_blocking=True) if cuda else t for t in pinned)

    n_eval = tc.eval_batches * tc.batch_size
    windows = {
        s: fixed_windows(ids, cfg.block_size, n_eval, tc.seed)
        for s, ids in (("train", train_ids), ("val", val_ids))
    }

    @torch.no_grad()
    def estimate(split: str, ids: np.ndarray) -> float:
        model.eval()
        loss = mean_window_loss(
            lambda x, y: loss_of(*to_device(x, y), reduction="sum"),
            ids, windows[split], cfg.block_size, tc.batch_size,
        )  # fmt: skip
        model.train()
        return loss

    history, reached, eval_seconds = [], None, 0.0
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    steady_start = None
    for step in range(max_iters):
        if step == 20:  # after compilation
            sync()
            steady_start, eval_at_start = time.perf_counter(), eval_seconds
        for group in opt.param_groups:
            group["lr"] = lr_at(tc, step)
        x, y = to_device(*train_batch(train_ids, cfg.block_size, tc.batch_size, tc.seed, step))
        loss = loss_of(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        if done % tc.eval_interval == 0:
            e0 = time.perf_counter()
            train_est, val = estimate("train", train_ids), estimate("val", val_ids)
            history.append(
                {
                    "step": done,
                    "train_loss": train_est,
                    "val_loss": val,
                    "elapsed": time.perf_counter() - t0,
                }
            )
            eval_seconds += time.perf_counter() - e0
            print(f"step {done} train {train_est:.4f} val {val:.4f}", flush=True)
            if reached is None and val <= args.target:
                reached = history[-1]
                break
    sync()
    wall = time.perf_counter() - t0
    steps = done - 20
    tps = None  # a run that ends before step 20 has no steady part
    if steady_start is not None and steps > 0:
        train_seconds = (time.perf_counter() - steady_start) - (eval_seconds - eval_at_start)
        tps = steps * tc.batch_size * cfg.block_size / train_seconds
    print(
        json.dumps(
            {
                "side": "pytorch",
                "torch": torch.__version__,
                "gpu": torch.cuda.get_device_name() if cuda else "cpu",
                "preset": args.preset,
                "steps": done,
                "tokens_per_sec": round(tps) if tps else None,
                "ms_per_step": round(1000 * train_seconds / steps, 2) if tps else None,
                "mfu": round(tps * flops_per_token(cfg, n_params) / H100_BF16_FLOPS, 3)
                if tps
                else None,
                "target": args.target,
                "first_at_target": reached,
                "wall_seconds": round(wall, 1),
                "history": history,
            }
        )
    )


if __name__ == "__main__":
    main()
