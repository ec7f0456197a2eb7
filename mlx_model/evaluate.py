"""Validation loss over a whole split, deterministic."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .data import sequential_windows
from .model import GPT


def evaluate(model: GPT, ids: np.ndarray, batch_size: int = 64) -> dict[str, float]:
    """Mean next-token loss over non-overlapping context-length windows covering `ids`.

    Every token after the first is predicted exactly once. Returns the loss (nats),
    its perplexity, bits per character and the number of predicted tokens.
    """
    if len(ids) < 2:
        raise ValueError(f"validation split has {len(ids)} tokens; need at least 2")
    model.eval()
    block = model.config.block_size
    windows = list(sequential_windows(ids, block))
    full = [w for w in windows if len(w[0]) == block]
    tail = [w for w in windows if len(w[0]) != block]
    total, count = 0.0, 0
    for i in range(0, len(full), batch_size):
        x = mx.array(np.stack([w[0] for w in full[i : i + batch_size]]))
        y = mx.array(np.stack([w[1] for w in full[i : i + batch_size]]))
        logits = model(x)
        total += nn.losses.cross_entropy(logits, y, reduction="sum").item()
        count += y.size
    for x_np, y_np in tail:
        logits = model(mx.array(x_np[None]))
        total += nn.losses.cross_entropy(logits, mx.array(y_np[None]), reduction="sum").item()
        count += y_np.size
    loss = total / count
    return {
        "val_loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_char": loss / math.log(2),
        "tokens": count,
    }
