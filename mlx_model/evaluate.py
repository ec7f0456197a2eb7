"""Validation loss over a whole split, deterministic."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np

from . import ops
from .data import sequential_windows
from .model import GPT
from .train import make_loss_sum


def evaluate(
    model: GPT, ids: np.ndarray, batch_size: int = 64, compiled: bool | None = None
) -> dict[str, float]:
    """Mean next-token loss over non-overlapping context-length windows covering `ids`.

    Every token after the first is predicted exactly once. Batches of full windows go
    through one function, compiled if `compiled`, by default where the backend compiles
    inference (`ops.compiles_inference`: not on MLX's CUDA backend, where compiling cost a
    fresh machine 19 s), and are summed on the device; the host reads the total once. Returns
    the loss (nats), its perplexity, bits per character and the number of predicted
    tokens.
    """
    if len(ids) < 2:
        raise ValueError(f"validation split has {len(ids)} tokens; need at least 2")
    model.eval()
    block = model.config.block_size
    windows = list(sequential_windows(ids, block))
    full = [w for w in windows if len(w[0]) == block]
    tail = [w for w in windows if len(w[0]) != block]
    compiled = ops.compiles_inference() if compiled is None else compiled
    loss_sum = make_loss_sum(model, compiled=compiled)
    loss_sum = loss_sum if compiled else ops.op_by_op(loss_sum)
    total = mx.zeros(())
    for i in range(0, len(full), batch_size):
        x = mx.array(np.stack([w[0] for w in full[i : i + batch_size]]))
        y = mx.array(np.stack([w[1] for w in full[i : i + batch_size]]))
        total = total + loss_sum(x, y)
    for x_np, y_np in tail:
        total = total + loss_sum(mx.array(x_np[None]), mx.array(y_np[None]))
    count = sum(len(w[1]) for w in windows)
    loss = total.item() / count
    return {**loss_figures(loss), "tokens": count}


def loss_figures(loss: float) -> dict[str, float]:
    """A mean next-token loss (nats) with its perplexity, exp(loss), and bits per
    character, loss / ln 2 (one token is one character). A loss past ~709.8 has a
    perplexity beyond float64 (inf, where `math.exp` raises OverflowError); NaN stays NaN."""
    try:
        perplexity = math.exp(loss)
    except OverflowError:
        perplexity = math.inf
    return {"val_loss": loss, "perplexity": perplexity, "bits_per_char": loss / math.log(2)}
