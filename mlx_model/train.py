"""The training loop: compiled AdamW steps on random windows, periodic evaluation, resume."""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from .checkpoint import (
    STATE,
    WEIGHTS,
    CorruptCheckpointError,
    load_train_state,
    save_model,
    save_train_state,
)
from .config import GPTConfig, TrainConfig
from .data import file_sha256, fixed_windows, get_batch, train_batch
from .model import GPT, loss_fn

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
# the folders `train` writes under its output folder: the best model so far, and the
# resumable state of the last checkpoint
BEST = "best"
LATEST = "latest"


class AdamWMatrices(optim.AdamW):
    """AdamW whose decoupled weight decay applies to matrices only (not biases or LayerNorm)."""

    def apply_single(self, gradient: mx.array, parameter: mx.array, state):
        if parameter.ndim < 2:
            return optim.Adam.apply_single(self, gradient, parameter, state)
        return super().apply_single(gradient, parameter, state)


def lr_schedule(tc: TrainConfig):
    """Linear warm-up to the peak, then cosine decay to `min_lr` at `max_iters`."""
    decay_steps = max(tc.max_iters - tc.warmup_iters, 1)
    cosine = optim.cosine_decay(tc.learning_rate, decay_steps, tc.min_lr)
    if tc.warmup_iters == 0:
        return cosine
    warmup = optim.linear_schedule(0.0, tc.learning_rate, tc.warmup_iters)
    return optim.join_schedules([warmup, cosine], [tc.warmup_iters])


def make_optimizer(tc: TrainConfig) -> AdamWMatrices:
    return AdamWMatrices(
        learning_rate=lr_schedule(tc),
        betas=[tc.beta1, tc.beta2],
        weight_decay=tc.weight_decay,
    )


def make_step(model: GPT, optimizer: optim.Optimizer, tc: TrainConfig, dtype=mx.float32):
    """The compiled training step `(x, y) -> loss`, updating model, optimizer and RNG state."""
    state = [model.state, optimizer.state, mx.random.state]
    value_and_grad = nn.value_and_grad(model, partial(loss_fn, dtype=dtype))

    @partial(mx.compile, inputs=state, outputs=state)
    def step(x: mx.array, y: mx.array) -> mx.array:
        loss, grads = value_and_grad(model, x, y)
        if tc.grad_clip > 0:
            grads, _ = optim.clip_grad_norm(grads, tc.grad_clip)
        optimizer.update(model, grads)
        return loss

    return step


@dataclass
class Progress:
    """What the loop reports to its callback."""

    step: int
    max_iters: int
    train_loss: float | None = None
    val_loss: float | None = None
    lr: float = 0.0
    tokens_per_sec: float = 0.0
    elapsed: float = 0.0
    kind: str = "log"  # "log" every log_interval, "eval" after an evaluation, "done" at the end


@dataclass
class TrainResult:
    best_val_loss: float
    best_step: int
    final_step: int
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: int | None = None
    tokens_per_sec: float = 0.0


def estimate_loss(model: GPT, ids: np.ndarray, starts: np.ndarray, block: int, batch: int, dtype):
    """Mean loss over fixed windows, in eval mode (no dropout)."""
    model.eval()
    total = 0.0
    for i in range(0, len(starts), batch):
        x, y = get_batch(ids, starts[i : i + batch], block)
        loss = loss_fn(model, mx.array(x), mx.array(y), dtype)
        total += loss.item() * len(x)
    model.train()
    return total / len(starts)


def _best_checkpoint_intact(out_dir: Path) -> bool:
    """Resuming needs the best checkpoint the latest one refers to, unchanged."""
    state_path = out_dir / LATEST / STATE
    if not state_path.exists():
        return False
    best = json.loads(state_path.read_text())["best"]
    if best["step"] < 0:
        return True
    weights = out_dir / BEST / WEIGHTS
    return weights.exists() and file_sha256(weights) == best["sha256"]


def train(
    cfg: GPTConfig,
    tc: TrainConfig,
    train_ids: np.ndarray,
    val_ids: np.ndarray,
    out_dir: Path,
    callback: Callable[[Progress], None] | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train a GPT, writing `latest/` (resumable) and `best/` checkpoints under `out_dir`.

    If `out_dir/latest` holds a complete checkpoint, training resumes from it and
    continues exactly as an uninterrupted run would. `stop_after` ends the run
    early at that step (after checkpointing), to simulate an interruption.
    Returns the best validation loss, its step and the evaluation history.
    """
    out_dir = Path(out_dir)
    dtype = DTYPES[tc.compute_dtype]
    mx.random.seed(tc.seed)
    model = GPT(cfg)
    optimizer = make_optimizer(tc)
    optimizer.init(model.trainable_parameters())
    mx.eval(model.parameters(), optimizer.state)

    state = None
    if _best_checkpoint_intact(out_dir):
        try:
            state = load_train_state(out_dir / LATEST, model, optimizer)
        except (CorruptCheckpointError, FileNotFoundError) as err:
            warnings.warn(f"not resuming: {err}; training from step 0", stacklevel=2)
            mx.random.seed(tc.seed)  # start exactly as a fresh run would
            model = GPT(cfg)
            optimizer = make_optimizer(tc)
            optimizer.init(model.trainable_parameters())
            mx.eval(model.parameters(), optimizer.state)
    if state is not None and state.get("train_config") != tc.to_dict():
        raise ValueError(f"{out_dir / 'latest'} was written with a different training config")
    start = state["step"] if state else 0
    history: list[dict[str, Any]] = state["history"] if state else []
    best = state["best"] if state else {"val_loss": math.inf, "step": -1}

    step_fn = make_step(model, optimizer, tc, dtype)

    eval_starts = {
        "train": fixed_windows(train_ids, cfg.block_size, tc.eval_batches * tc.batch_size, tc.seed),
        "val": fixed_windows(val_ids, cfg.block_size, tc.eval_batches * tc.batch_size, tc.seed),
    }
    schedule = lr_schedule(tc)
    model.train()
    tokens_per_step = tc.batch_size * cfg.block_size
    t_last, step_last, t0 = time.perf_counter(), start, time.perf_counter()
    tps = 0.0
    losses = []
    end = tc.max_iters if stop_after is None else min(stop_after, tc.max_iters)
    for step in range(start, end):
        x, y = train_batch(train_ids, cfg.block_size, tc.batch_size, tc.seed, step)
        mx.random.seed(tc.seed * 1_000_003 + step)  # dropout masks depend on (seed, step) only
        losses.append(step_fn(mx.array(x), mx.array(y)))
        mx.async_eval(losses[-1], model.parameters(), optimizer.state)
        done = step + 1
        if done % tc.log_interval == 0 or done == tc.max_iters:
            mean_loss = mx.mean(mx.stack(losses)).item()  # the only host sync
            losses.clear()
            now = time.perf_counter()
            tps = tokens_per_step * (done - step_last) / max(now - t_last, 1e-9)
            t_last, step_last = now, done
            if callback:
                callback(
                    Progress(
                        done, tc.max_iters, mean_loss, None, float(schedule(done)), tps, now - t0
                    )
                )
        if done % tc.eval_interval == 0 or done == tc.max_iters:
            record = {"step": done, "lr": float(schedule(done)), "tokens_per_sec": tps}
            for split, ids in (("train", train_ids), ("val", val_ids)):
                record[f"{split}_loss"] = estimate_loss(
                    model, ids, eval_starts[split], cfg.block_size, tc.batch_size, dtype
                )
            history.append(record)
            if record["val_loss"] < best["val_loss"]:
                save_model(out_dir / BEST, model)
                sha = file_sha256(out_dir / BEST / WEIGHTS)
                best = {"val_loss": record["val_loss"], "step": done, "sha256": sha}
            if callback:
                callback(
                    Progress(
                        done,
                        tc.max_iters,
                        record["train_loss"],
                        record["val_loss"],
                        record["lr"],
                        tps,
                        time.perf_counter() - t0,
                        kind="eval",
                    )
                )
        if done % tc.checkpoint_interval == 0 or done == end:
            save_train_state(
                out_dir / LATEST,
                model,
                optimizer,
                {"step": done, "history": history, "best": best, "train_config": tc.to_dict()},
            )
    result = TrainResult(best["val_loss"], best["step"], end, history, start or None, tps)
    if callback:
        callback(
            Progress(
                end,
                tc.max_iters,
                None,
                best["val_loss"],
                0.0,
                tps,
                time.perf_counter() - t0,
                "done",
            )
        )
    return result
