"""The training loop: compiled AdamW steps on random windows, compiled loss estimates,
early stopping and exact resume; data-parallel over MLX's distributed group when the
process was started by `mlx.launch` (a group of one is plain single-process training)."""

from __future__ import annotations

import hashlib
import json
import math
import signal
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_map, tree_unflatten

from . import ops, warmup
from .checkpoint import (
    BEST_RECORD,
    STATE,
    WEIGHTS,
    CorruptCheckpointError,
    load_train_state,
    save_model,
    save_train_state,
    snapshot,
)
from .config import GPTConfig, TrainConfig
from .data import file_sha256, fixed_windows, get_batch, train_batch
from .distributed import process_group
from .files import write_text_atomic
from .model import GPT
from .ops import cuda
from .optimizer import FlatOptimizer, begin_step, newton_schulz
from .runtime import kernel_cache

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}
# the folders `train` writes under its output folder: the best model so far, and the
# resumable state of the last checkpoint
BEST = "best"
LATEST = "latest"


class TrainingDiverged(ArithmeticError):
    """The loss became NaN or infinite at `step`: the weights are lost from there on.
    Nothing is marked finished; `best/` holds only finite, better-than-before models."""

    def __init__(self, step: int, loss: float, learning_rate: float, grad_clip: float = 0.0):
        super().__init__(step, loss, learning_rate, grad_clip)  # what pickling rebuilds it from
        self.step, self.loss, self.learning_rate = step, loss, learning_rate
        self.grad_clip = grad_clip

    def __str__(self) -> str:
        clip = "" if self.grad_clip > 0 else ", or grad_clip > 0"
        return (
            f"training diverged at step {self.step}: loss {self.loss}; try a lower "
            f"learning_rate (it is {self.learning_rate:g}), more warmup_iters{clip}"
        )


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training between two steps; the resumable checkpoint in
    `latest/` holds `step` (rerunning the same command resumes from it)."""

    last: TrainingInterrupted | None = None  # this process's latest, once raised

    def __init__(self, step: int, signal_number: int):
        super().__init__(step, signal_number)
        self.step, self.signal_number = step, signal_number

    def __str__(self) -> str:
        return f"interrupted by {signal.Signals(self.signal_number).name} at step {self.step}"


@contextmanager
def deferred_stop_signals(enabled: bool = True) -> Iterator[Callable[[], int | None]]:
    """While active, SIGINT and SIGTERM only record their number, which the yielded
    function returns (None until one came): the loop stops between two steps, where
    model, optimizer and step agree, instead of wherever Python raised, and writes its
    checkpoint (a second signal meanwhile is noted too, not let loose half-way through
    it). The handlers that were there before come back when the loop ends. Off the
    main thread (no handler can be set there), or not `enabled`, it records nothing."""
    received: list[int] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return

    def restore() -> None:
        for number, handler in previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)

    def note(number: int, frame: Any) -> None:
        received.append(number)  # a second one, while the checkpoint is written, too

    previous = {n: signal.signal(n, note) for n in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: received[0] if received else None
    finally:
        restore()


class AdamWMatrices(optim.AdamW):
    """AdamW whose decoupled weight decay applies to matrices only (not biases or LayerNorm)."""

    def apply_single(self, gradient: mx.array, parameter: mx.array, state):
        if parameter.ndim < 2:
            return optim.Adam.apply_single(self, gradient, parameter, state)
        return super().apply_single(gradient, parameter, state)


class BatchedMuon(optim.Muon):
    """MLX's Muon (the same state, momentum and update), with the Newton-Schulz iterations
    of all matrices of one shape run as batched products in `dtype` (bfloat16, as Muon's
    authors run them, where the model computes in it). MLX's own runs them matrix by
    matrix in float32: for nanogpt-char's 24 matrices, 360 small products a step, which on
    a GPU cost more in launches than in arithmetic."""

    def __init__(self, learning_rate, dtype: mx.Dtype = mx.float32, **kwargs: Any):
        super().__init__(learning_rate, **kwargs)
        self.dtype = dtype

    def apply_gradients(self, gradients: dict, parameters: dict):
        begin_step(self, gradients)
        params = dict(tree_flatten(parameters))
        states = dict(tree_flatten(self.state, is_leaf=lambda n: isinstance(n, dict) and "v" in n))
        updates, groups = {}, defaultdict(list)
        flat_gradients = tree_flatten(gradients)
        for path, g in flat_gradients:
            p, state = params[path], states[path]
            if self.weight_decay != 0:
                g = g + self.weight_decay * p
            v = state["v"] = self.momentum * state["v"] + (1 - self.momentum) * g
            u = g * (1 - self.momentum) + v * self.momentum if self.nesterov else v
            if u.ndim < 2:  # as MLX's: a vector moves by its momentum alone
                updates[path] = p - self.learning_rate.astype(g.dtype) * u
                continue
            flat = u.reshape(u.shape[0], -1)
            tall = flat.shape[0] > flat.shape[1]
            wide = flat.T if tall else flat
            groups[wide.shape].append((path, tall, wide))
        for members in groups.values():
            x = mx.stack([w for *_, w in members]).astype(mx.float32)
            x = x / (mx.sqrt((x * x).sum(axis=(1, 2), keepdims=True)) + 1e-7)
            x = newton_schulz(x.astype(self.dtype), self.ns_steps)
            for (path, tall, _), o in zip(members, x, strict=True):
                p = params[path]
                step = (o.T if tall else o).reshape(p.shape).astype(p.dtype)
                lr = self.learning_rate.astype(p.dtype) * max(1, p.shape[-2] / p.shape[-1]) ** 0.5
                updates[path] = p - lr * step
        return tree_unflatten([(path, updates[path]) for path, _ in flat_gradients])


def lr_schedule(tc: TrainConfig, peak: float | None = None):
    """Linear warm-up to the peak (`learning_rate` unless given), then cosine decay to
    `min_lr` (scaled with the peak) at `max_iters`."""
    peak = tc.learning_rate if peak is None else peak
    floor = tc.min_lr * peak / tc.learning_rate
    decay_steps = max(tc.max_iters - tc.warmup_iters, 1)
    cosine = optim.cosine_decay(peak, decay_steps, floor)
    if tc.warmup_iters == 0:
        return cosine
    warmup = optim.linear_schedule(0.0, peak, tc.warmup_iters)
    return optim.join_schedules([warmup, cosine], [tc.warmup_iters])


def _in_blocks(path: str, parameter: mx.array) -> bool:
    """The weight matrices of the transformer blocks (what Muon optimises)."""
    return path.startswith("h.") and parameter.ndim == 2


LINEARS = ("c_attn", "c_proj", "c_fc", "lm_head")  # GPT-2's names of its Linear layers


def _in_linears(path: str, parameter: mx.array) -> bool:
    """The weights and biases of the Linear layers: what the model computes with in the
    compute dtype as they are (`model.Linear`), so the training step can hand them over
    cast already (`FlatOptimizer.compute_leaves`)."""
    parts = path.split(".")
    return len(parts) >= 2 and parts[-2] in LINEARS


def make_optimizer(tc: TrainConfig, joined: bool | None = None) -> optim.Optimizer:
    """AdamW with decay on matrices; with `optimizer="muon"`, Muon (Nesterov momentum
    0.95, five Newton-Schulz steps in the compute dtype, no decay) on the blocks' weight
    matrices and that AdamW on the embeddings, the tied head, biases and norms.

    `joined` (default: where the ops backend asks for it, `Reference.joined_optimizer`:
    MLX's CUDA backend) takes one update over all parameters at once, clipping the
    gradient norm itself (`mlx_model.optimizer.FlatOptimizer`); otherwise MLX's optimizers
    update each parameter on its own, and `make_step` clips. The same arithmetic per
    element; the joined form costs a copy of the gradients and parameters a step, which
    made a compiled CPU step 5% to 11% slower (`quick`, 2 cores), and saves ~1,400 of an
    uncompiled step's ~4,200 graph nodes, which a GPU runs one launch each."""
    if joined is None:
        joined = ops.backend(DTYPES[tc.compute_dtype], training=True).joined_optimizer
    muon = tc.optimizer == "muon"
    if joined:
        half = DTYPES[tc.compute_dtype] != mx.float32
        return FlatOptimizer(
            learning_rate=lr_schedule(tc),
            betas=(tc.beta1, tc.beta2),
            weight_decay=tc.weight_decay,
            grad_clip=tc.grad_clip,
            muon_learning_rate=lr_schedule(tc, tc.muon_learning_rate) if muon else None,
            for_muon=_in_blocks if muon else None,
            muon_dtype=DTYPES[tc.compute_dtype],
            for_compute=_in_linears if half else None,
        )
    adamw = AdamWMatrices(
        learning_rate=lr_schedule(tc),
        betas=[tc.beta1, tc.beta2],
        weight_decay=tc.weight_decay,
    )
    if not muon:
        return adamw
    muon_optimizer = BatchedMuon(
        lr_schedule(tc, tc.muon_learning_rate), DTYPES[tc.compute_dtype], weight_decay=0.0
    )
    return optim.MultiOptimizer([muon_optimizer, adamw], [_in_blocks])


def make_step(
    model: GPT,
    optimizer: optim.Optimizer,
    tc: TrainConfig,
    dtype=mx.float32,
    group=None,
    compiled: bool = True,
):
    """The compiled training step `(x, y) -> loss`, updating model, optimizer and RNG state
    (`compiled=False`: the same step run op by op, which compiles no fused kernels).

    Over a group of several processes, each passes its share of the batch and gradients
    are averaged across the group (batched all-reduces, sent in the compute dtype unless
    `grad_exchange` is float32). The returned loss is this
    process's: reducing it in every step cost 4 ms a step on H100s (docs/BENCHMARKS.md),
    so the loop reduces the losses once per log interval instead.
    """
    world = group.size() if group is not None else 1
    exchange = dtype if tc.grad_exchange == "compute" else mx.float32
    if isinstance(optimizer, FlatOptimizer) and optimizer.for_compute is not None:
        return _master_step(model, optimizer, dtype, group, exchange, compiled)
    state = [model.state, optimizer.state, mx.random.state]
    value_and_grad = nn.value_and_grad(model, partial(_mean_loss, dtype=dtype))

    def step(x: mx.array, y: mx.array) -> mx.array:
        loss, grads = value_and_grad(model, x, y)
        if world > 1:
            grads = average_gradients(grads, group, exchange)
        if tc.grad_clip > 0 and not isinstance(optimizer, FlatOptimizer):
            grads, _ = optim.clip_grad_norm(grads, tc.grad_clip)  # FlatOptimizer clips itself
        optimizer.update(model, grads)
        return loss

    return mx.compile(step, inputs=state, outputs=state) if compiled else step


def _master_step(model: GPT, optimizer: FlatOptimizer, dtype, group, exchange, compiled: bool):
    """`make_step`'s step with the parameters kept flat in `optimizer.master`: the model
    computes with `compute_leaves` (its Linear layers' weights and biases cast to `dtype`
    in one operation), the gradients come back in their dtypes and are joined and cast once
    (`step_master`), and the model's parameters become float32 views of the new master.
    The same arithmetic as joining the model's parameters each step in the same layout,
    without the parameters' join and the Linear layers' casts forward and back: in one
    step's graph of nanogpt-char's model, 286 casts become 192 and the 170 arrays joined
    95 (`python bench/step_graph.py`); on an H200 each is a kernel launch, and copies were
    370 of the step's 822 (docs/runs/profile-char-h200-20261201i-1.txt).

    Parameters replaced between steps (a checkpoint loaded into the model) are taken as
    the master again before the next step."""
    if not optimizer._initialized:  # MLX's optimizers lay out their state on first use
        optimizer.init(model.trainable_parameters())
    optimizer.bind(model.trainable_parameters())
    state = [model.state, optimizer.state, optimizer.master, mx.random.state]
    world = group.size() if group is not None else 1

    def average(g: mx.array) -> mx.array:  # one all-reduce of the flat gradient
        return (mx.distributed.all_sum(g.astype(exchange), group=group) / world).astype(g.dtype)

    def step(x: mx.array, y: mx.array) -> mx.array:
        def loss_of(leaves: dict) -> mx.array:
            model.update(tree_unflatten(list(leaves.items())))
            return _mean_loss(model, x, y, dtype)

        leaves = optimizer.compute_leaves(optimizer.master["flat"], dtype)
        loss, grads = mx.value_and_grad(loss_of)(leaves)
        new = optimizer.step_master(grads, average if world > 1 else None)
        model.update(tree_unflatten(list(new.items())))
        return loss

    fn = mx.compile(step, inputs=state, outputs=state) if compiled else step
    read = _leaf_reader(model, optimizer.paths)  # faster than walking the module tree

    def run(x: mx.array, y: mx.array) -> mx.array:
        if not optimizer.is_bound(read()):
            optimizer.bind(model.trainable_parameters())
        loss = fn(x, y)
        optimizer.mark(read())
        return loss

    return run


def _leaf_reader(model: nn.Module, paths: list[str]) -> Callable[[], list[mx.array]]:
    """A function returning the model's arrays at `paths` ("h.0.attn.c_attn.weight"), in
    that order, by indexing the modules directly."""
    keys = [[int(k) if k.isdigit() else k for k in path.split(".")] for path in paths]

    def read() -> list[mx.array]:
        arrays = []
        for path in keys:
            node = model
            for key in path:
                node = node[key]
            arrays.append(node)
        return arrays

    return read


def average_gradients(grads: dict, group, dtype: mx.Dtype = mx.float32) -> dict:
    """`nn.average_gradients` (batched all-reduces over the group) with the arrays sent in
    `dtype`; the averages come back in each gradient's own dtype. On two H100s, bfloat16
    halves the bytes and took the exchange from 0.57 ms a step to 0.05 ms
    (docs/BENCHMARKS.md)."""
    if all(g.dtype == dtype for _, g in tree_flatten(grads)):
        return nn.average_gradients(grads, group=group)
    sent = tree_map(lambda g: g.astype(dtype), grads)
    return tree_map(
        lambda avg, g: avg.astype(g.dtype), nn.average_gradients(sent, group=group), grads
    )


def _mean_loss(model: GPT, x: mx.array, y: mx.array, dtype: mx.Dtype) -> mx.array:
    return ops.loss(model, x, y, dtype).mean()  # the batch in the ops backend's CPU lanes


def make_loss_sum(model: GPT, dtype=mx.float32, compiled: bool = True):
    """The compiled `(x, y) -> summed next-token loss`, for evaluation (call in eval mode)."""

    def loss_sum(x: mx.array, y: mx.array) -> mx.array:
        return ops.loss(model, x, y, dtype).sum()

    return mx.compile(loss_sum, inputs=model.state) if compiled else loss_sum


class StepFunctions:
    """The training step and the loss estimate, run op by op until `compile_now()` first
    returns True and compiled from then on (both compute the same functions).

    With `compile_now=None` they are compiled from the first step, unless the kernels are
    not in MLX's kernel cache yet (a GPU's first run): then a `mlx_model.warmup` child
    compiles them while the loop runs uncompiled, and the loop switches when it is done.
    """

    def __init__(self, model, optimizer, tc: TrainConfig, dtype, group, compile_now=None):
        world = group.size() if group is not None else 1
        cfg = model.config  # its attention decides whether cuDNN's runs
        self.signature = warmup.run_signature(cfg, tc, world)
        self.warmup = None
        if compile_now is None and world == 1:
            self.warmup = warmup.start(model.config, tc, self.signature)
            compile_now = self.warmup.ready if self.warmup else None
        self._compile_now = compile_now
        self.compiled_from: int | None = None
        self.layers_from: int | None = None  # uncompiled steps with MLX's layers compiled
        step, loss_sum = (
            make_step(model, optimizer, tc, dtype, group, compiled=False),
            make_loss_sum(model, dtype, compiled=False),
        )
        self._fns = {
            "compiled": (
                make_step(model, optimizer, tc, dtype, group),
                make_loss_sum(model, dtype),
            ),
            # no warm-up child: the step compiles MLX's layers in the run, the estimate not
            "uncompiled": (step, ops.op_by_op(loss_sum)),
            # until the warm-up child has cached the kernels of MLX's own compiled layers
            "plain": (ops.op_by_op(step), ops.op_by_op(loss_sum)),
            # after: the uncompiled step and estimate with those layers compiled (loaded)
            "layers": (step, loss_sum),
        }
        self._recorded = False

    def at(self, step: int) -> tuple[Callable, Callable]:
        """(step function, loss-sum function) for training step `step` (0-based).

        Uncompiled, the functions compiled in their own right inside the layers (the
        GELU's: `nn.gelu_approx`, or `ops.gpu`'s in half-precision training) run compiled
        once a warm-up child has cached their kernels, and op by op before: compiling
        them in the run held its first steps back 4 to 5 s on an H200, and op by op they
        ran 18% fewer tokens/s (docs/runs/gpu11-cold-warmup*.log). Without a warm-up child
        (`compile_now` given), the step compiles them in the run and the estimate does not
        (its own GELU kernel cost about 8 s of a cold run's first one)."""
        if self.compiled_from is None and (self._compile_now is None or self._compile_now()):
            self.compiled_from = step
            if self.warmup is not None and self.warmup.failed:
                warnings.warn(
                    f"the kernel warm-up failed; compiling in the run: {self.warmup.failed}",
                    stacklevel=2,
                )
        if self.compiled_from is not None:
            return self._fns["compiled"]
        if self.warmup is None:
            return self._fns["uncompiled"]
        if self.warmup.eager_ready():
            if self.layers_from is None:
                self.layers_from = step
            return self._fns["layers"]
        return self._fns["plain"]

    def after_estimate(self) -> None:
        """At a sync point: share the kernels compiled so far, and once a compiled step
        and estimate have run, record that this configuration's kernels are cached."""
        cache = kernel_cache.active()
        if cache is None:
            return
        cache.publish()
        if self.compiled_from is not None and not self._recorded:
            cache.mark_warm(self.signature)
            self._recorded = True

    def close(self) -> None:
        if self.warmup is not None:
            self.warmup.close()


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
    kind: str = "log"  # "log" every log_interval, "eval" after an evaluation, "done" at the
    # end, "resume" once before the first step of a run that resumes from a checkpoint
    start: int = 0  # the step this process started from (elapsed counts from there)
    attention: str | None = None  # "resume" on a GPU: the attention the checkpoint began
    # with ("cudnn" or "mlx"), which the resumed run keeps (its dropout masks differ)


@dataclass
class TrainResult:
    best_val_loss: float
    best_step: int
    final_step: int
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per evaluation
    resumed_from: int | None = None
    tokens_per_sec: float = 0.0
    train_log: list[dict[str, Any]] = field(default_factory=list)  # one per log interval
    stopped_early: bool = False
    seconds: dict[str, float] = field(default_factory=dict)  # wall time: total, eval, checkpoints
    compiled_from: int | None = None  # the first compiled step (later than the first while
    # a cold GPU kernel cache was being filled by `mlx_model.warmup`)
    layers_from: int | None = None  # before it, the first uncompiled step that ran MLX's own
    # compiled layers (once the warm-up had cached their kernels); None: no warm-up ran
    attention: str | None = None  # on a GPU: "cudnn" or "mlx" (mlx_model.ops.cuda)


# tokens per forward pass of a loss estimate on a GPU: a few large batches rather than
# many of the training batch's size, which there cost kernel launches more than
# arithmetic. On the CPU, where arithmetic dominates, larger passes only cost memory
# (the default job's estimates took 10 s instead of 7 and twice the memory).
EVAL_TOKENS = 65536


def estimate_loss(
    loss_sum, ids: np.ndarray, starts: np.ndarray, block: int, batch: int, group=None
):
    """Mean loss over fixed windows, summed on the device: one host read per estimate.
    On a GPU the windows go `EVAL_TOKENS` at a time (at least `batch` per forward pass).
    Over a group, each process takes every world-th window and the sums are reduced."""
    world, rank = (group.size(), group.rank()) if group is not None else (1, 0)
    mine = starts[rank::world]
    if mx.default_device() != mx.cpu:
        batch = max(batch, EVAL_TOKENS // block)
    total = mx.zeros(())
    for i in range(0, len(mine), batch):
        x, y = get_batch(ids, mine[i : i + batch], block)
        total = total + loss_sum(mx.array(x), mx.array(y))
    if world > 1:
        total = mx.distributed.all_sum(total, group=group)
    return total.item() / (len(starts) * block)


class CheckpointWriter:
    """Checkpoint files written in order on one background thread while training goes
    on. A write takes its arrays (`snapshot`) when it is queued, so it holds the state of
    its own step; `close` returns when every queued write is on disk (raising the first
    error). A killed process leaves at most an incomplete checkpoint, which is ignored."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="checkpoint")
        self._pending: list[Future] = []

    def submit(self, fn: Callable[..., Any], *args: Any) -> None:
        self._pending.append(self._pool.submit(fn, *args))
        for done in [f for f in self._pending if f.done()]:
            self._pending.remove(done)
            done.result()

    def close(self) -> None:
        try:
            for f in self._pending:
                f.result()
        finally:
            self._pool.shutdown(wait=True)


def _write_best(out_dir: Path, model: GPT, taken: dict, best: dict[str, Any]) -> None:
    save_model(out_dir / BEST, model, taken["weights"])
    best["sha256"] = file_sha256(out_dir / BEST / WEIGHTS)
    # the best's own record: a best written after the latest checkpoint is still valid
    write_text_atomic(out_dir / BEST / BEST_RECORD, json.dumps(best))


def weights_digest(weights: dict[str, np.ndarray]) -> str:
    """SHA-256 of every parameter's bytes (host copies, as `snapshot` takes them), in a
    fixed order."""
    h = hashlib.sha256()
    for name, value in sorted(weights.items()):
        h.update(name.encode() + value.tobytes())
    return h.hexdigest()


def check_same_weights(weights: dict[str, np.ndarray], group) -> None:
    """Raise if the processes of the group hold different weights (compared by digest)."""
    digest = np.frombuffer(bytes.fromhex(weights_digest(weights)), dtype=np.int32)
    gathered = np.array(mx.distributed.all_gather(mx.array(digest), group=group))
    rows = gathered.reshape(group.size(), -1)
    differ = [r for r in range(group.size()) if not np.array_equal(rows[r], rows[0])]
    if differ:
        raise RuntimeError(f"the weights of rank(s) {differ} differ from rank 0's")


def _resumable_best(out_dir: Path, state: dict[str, Any]) -> dict[str, Any] | None:
    """The best-so-far to resume with: the one `latest/` names if `best/` still holds it,
    or the one `best/` records if it was written after `latest/` (an estimate between two
    checkpoints found a better model; resuming replays that estimate). None if `best/`
    holds neither."""
    best = state["best"]
    weights = out_dir / BEST / WEIGHTS
    digest = file_sha256(weights) if weights.exists() else None
    try:
        newer = json.loads((out_dir / BEST / BEST_RECORD).read_text())
    except (OSError, ValueError):
        newer = {}
    if newer.get("step", -1) > state["step"] and newer.get("sha256") == digest:
        return newer
    return best if best["step"] < 0 or best.get("sha256") == digest else None


def _fresh(cfg: GPTConfig, tc: TrainConfig) -> tuple[GPT, optim.Optimizer]:
    mx.random.seed(tc.seed)
    model = GPT(cfg)
    optimizer = make_optimizer(tc)
    optimizer.init(model.trainable_parameters())
    mx.eval(model.parameters(), optimizer.state)
    return model, optimizer


def _restore(cfg: GPTConfig, tc: TrainConfig, out_dir: Path, world: int):
    """Model, optimizer and the saved loop state (None for a fresh start)."""
    model, optimizer = _fresh(cfg, tc)
    try:
        state = load_train_state(out_dir / LATEST, model, optimizer)
        if state is None and any((out_dir / LATEST).glob("*")):
            raise CorruptCheckpointError(
                f"{out_dir / LATEST} has no {STATE}: its process was stopped while writing it"
            )
        best = _resumable_best(out_dir, state) if state is not None else None
        if state is not None and best is None:
            raise CorruptCheckpointError(
                f"{out_dir / BEST} does not hold the best model of step {state['best']['step']} "
                f"that {out_dir / LATEST / STATE} names, nor a later one"
            )
    except (CorruptCheckpointError, FileNotFoundError) as err:
        warnings.warn(f"not resuming: {err}; training from step 0", stacklevel=3)
        model, optimizer = _fresh(cfg, tc)  # start exactly as a fresh run would
        return model, optimizer, None
    if state is not None:
        state["best"] = best
    saved = state.get("train_config", {}) if state is not None else None
    if saved is not None and {k: saved.get(k) for k in tc.key_dict()} != tc.key_dict():
        raise ValueError(f"{out_dir / LATEST} was written with a different training config")
    if state is not None and state.get("world_size", 1) != world:
        raise ValueError(
            f"{out_dir / LATEST} was written by {state.get('world_size', 1)} processes, "
            f"not {world}: resume with the same layout"
        )
    return model, optimizer, state


def _first_non_finite(losses: list[mx.array], done: int, mean: float) -> tuple[int, float]:
    """The step and loss of the first non-finite loss among the log interval's `losses`
    (the last of which is step `done`); (done, mean) if this process's are all finite."""
    values = np.array(mx.stack(losses).astype(mx.float32))
    bad = np.flatnonzero(~np.isfinite(values))
    if not len(bad):
        return done, mean
    return done - len(values) + int(bad[0]) + 1, float(values[bad[0]])


def _patience_spent(tc: TrainConfig, history: list[dict[str, Any]], best_step: int) -> bool:
    """Early stopping: `patience` evaluations in a row without a new best."""
    return tc.patience > 0 and sum(h["step"] > best_step for h in history) >= tc.patience


def train(
    cfg: GPTConfig,
    tc: TrainConfig,
    train_ids: np.ndarray,
    val_ids: np.ndarray,
    out_dir: Path,
    callback: Callable[[Progress], None] | None = None,
    stop_after: int | None = None,
    compile_now: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train a GPT, writing `latest/` (resumable) and `best/` checkpoints under `out_dir`.

    If `out_dir/latest` holds a complete checkpoint, training resumes from it and
    continues exactly as an uninterrupted run would. `stop_after` ends the run
    early at that step (after checkpointing), to simulate an interruption; `patience`
    ends it when validation stops improving. `compile_now` (see `StepFunctions`) decides
    when the uncompiled steps give way to compiled ones; by default, at once unless a GPU's
    kernel cache lacks this run's kernels. Under `mlx.launch` every process runs
    this with the same arguments: each computes its share of every batch, rank 0
    alone writes files and reports. Returns the best validation loss, its step and
    the history.

    Raises `TrainingDiverged` when a loss is NaN or infinite (checked where the host
    reads it: every `log_interval` steps and at each estimate), naming the first such
    step; `TrainingInterrupted` after SIGINT or SIGTERM (single process, main thread),
    once the checkpoint of the last finished step is written.
    """
    out_dir = Path(out_dir)
    dtype = DTYPES[tc.compute_dtype]
    group = process_group()
    world, rank = group.size(), group.rank()
    if tc.batch_size % world:
        raise ValueError(f"batch_size {tc.batch_size} does not split over {world} processes evenly")
    writer = rank == 0
    model, optimizer, state = _restore(cfg, tc, out_dir, world)
    if state and state.get("attention"):  # the attention it began with: the same masks
        cuda.pin(state["attention"])
    start = state["step"] if state else 0
    history: list[dict[str, Any]] = state["history"] if state else []
    train_log: list[dict[str, Any]] = state.get("train_log", []) if state else []
    best = state["best"] if state else {"val_loss": math.inf, "step": -1}

    steps = StepFunctions(model, optimizer, tc, dtype, group if world > 1 else None, compile_now)
    n_eval = tc.eval_batches * tc.batch_size
    eval_starts = {
        "train": fixed_windows(train_ids, cfg.block_size, n_eval, tc.seed),
        "val": fixed_windows(val_ids, cfg.block_size, n_eval, tc.seed),
    }
    schedule = lr_schedule(tc)
    report = callback if writer and callback else (lambda p: None)
    share = slice(rank * tc.batch_size // world, (rank + 1) * tc.batch_size // world)
    tokens_per_step = tc.batch_size * cfg.block_size
    t_last, step_last, t0 = time.perf_counter(), start, time.perf_counter()
    tps = 0.0
    losses = []
    end = tc.max_iters if stop_after is None else min(stop_after, tc.max_iters)
    stopped = _patience_spent(tc, history, best["step"])
    spent = {"eval": 0.0, "checkpoints": 0.0}
    done = start
    if state is not None:
        began = state.get("attention")
        report(Progress(start, tc.max_iters, kind="resume", start=start, attention=began))
    model.train()
    files = CheckpointWriter()  # rank 0 writes; checkpoints are on disk when this returns
    # several processes must stop at one step: under mlx.launch a signal ends them all
    stop_signals = deferred_stop_signals(enabled=world == 1)
    stop_requested, interrupted = stop_signals.__enter__(), None
    try:
        for step in range(start, end if not stopped else start):
            x, y = train_batch(train_ids, cfg.block_size, tc.batch_size, tc.seed, step)
            # dropout masks depend on (seed, step, rank) only; a group of one keeps the old seeds
            mx.random.seed((tc.seed * 1_000_003 + step) * world + rank)
            step_fn, loss_sum = steps.at(step)
            losses.append(step_fn(mx.array(x[share]), mx.array(y[share])))
            mx.async_eval(losses[-1], model.parameters(), optimizer.state)
            done = step + 1
            if done % tc.log_interval == 0 or done == tc.max_iters:
                mean = mx.mean(mx.stack(losses))
                if world > 1:
                    mean = mx.distributed.all_sum(mean, group=group) / world
                mean_loss = mean.item()  # the only host sync between estimates
                if not math.isfinite(mean_loss):
                    raise TrainingDiverged(
                        *_first_non_finite(losses, done, mean_loss), tc.learning_rate, tc.grad_clip
                    )
                losses.clear()
                now = time.perf_counter()
                tps = tokens_per_step * (done - step_last) / max(now - t_last, 1e-9)
                t_last, step_last = now, done
                lr = float(schedule(done))
                train_log.append(
                    {"step": done, "train_loss": mean_loss, "lr": lr, "tokens_per_sec": tps}
                )
                report(
                    Progress(done, tc.max_iters, mean_loss, None, lr, tps, now - t0, start=start)
                )
            if done % tc.eval_interval == 0 or done == tc.max_iters:
                e0 = time.perf_counter()
                model.eval()
                record = {"step": done, "lr": float(schedule(done)), "tokens_per_sec": tps}
                for split, ids in (("train", train_ids), ("val", val_ids)):
                    record[f"{split}_loss"] = estimate_loss(
                        loss_sum, ids, eval_starts[split], cfg.block_size, tc.batch_size // world,
                        group if world > 1 else None,
                    )  # fmt: skip
                model.train()
                for split in ("train", "val"):
                    if not math.isfinite(record[f"{split}_loss"]):
                        loss = record[f"{split}_loss"]
                        raise TrainingDiverged(done, loss, tc.learning_rate, tc.grad_clip)
                steps.after_estimate()
                record["elapsed"] = time.perf_counter() - t0  # since this process started training
                history.append(record)
                if record["val_loss"] < best["val_loss"]:
                    best = {"val_loss": record["val_loss"], "step": done}
                    if writer:  # the digest is filled in before any later state.json is written
                        files.submit(_write_best, out_dir, model, snapshot(model), best)
                stopped = _patience_spent(tc, history, best["step"])
                spent["eval"] += time.perf_counter() - e0
                t_last += time.perf_counter() - e0  # throughput counts training steps only
                report(
                    Progress(
                        done, tc.max_iters, record["train_loss"], record["val_loss"], record["lr"],
                        tps, time.perf_counter() - t0, kind="eval",
                    )
                )  # fmt: skip
            interrupted = stop_requested()
            if done % tc.checkpoint_interval == 0 or done == end or stopped or interrupted:
                c0 = time.perf_counter()
                taken = snapshot(model, optimizer if writer else None)  # one host copy
                if world > 1:
                    check_same_weights(taken["weights"], group)
                if writer:
                    loop = {"step": done, "history": list(history), "train_log": list(train_log)}
                    meta = {"train_config": tc.to_dict(), "world_size": world}
                    meta["attention"] = steps.signature["ops"].get("attention")
                    state_now = {**loop, "best": best, **meta}
                    files.submit(
                        save_train_state, out_dir / LATEST, model, optimizer, state_now, taken
                    )
                spent["checkpoints"] += time.perf_counter() - c0
                t_last += time.perf_counter() - c0
            if stopped or interrupted:
                break
    finally:
        stop_signals.__exit__(None, None, None)
        steps.close()
        files.close()
    interrupted = interrupted or stop_requested()  # a signal that came after the last step
    if interrupted:  # the checkpoint of `done` is on disk
        # also kept on the class: a second signal while this unwinds raises a new
        # exception, which no longer carries the step
        TrainingInterrupted.last = TrainingInterrupted(done, interrupted)
        raise TrainingInterrupted.last
    final = done if stopped else end
    spent["total"] = time.perf_counter() - t0
    result = TrainResult(
        best["val_loss"], best["step"], final, history, start or None, tps, train_log, stopped,
        {k: round(v, 3) for k, v in spent.items()}, steps.compiled_from, steps.layers_from,
        steps.signature["ops"].get("attention"),
    )  # fmt: skip
    report(
        Progress(
            final, tc.max_iters, None, best["val_loss"], 0.0, tps, time.perf_counter() - t0, "done"
        )
    )
    return result
