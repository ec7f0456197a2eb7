"""The training's optimizer as one update over all parameters at once.

AdamW with decoupled weight decay on matrices only (Loshchilov and Hutter, "Decoupled
Weight Decay Regularization", 2019; nanoGPT's grouping), or Muon (Jordan et al., 2024:
Nesterov momentum, then five Newton-Schulz steps towards the orthogonal factor) on the
blocks' weight matrices with that AdamW on the rest; the global gradient norm clipped
first, as `torch.nn.utils.clip_grad_norm_` and `mlx.optimizers.clip_grad_norm` do.

MLX's optimizers update each parameter on its own (`Optimizer.apply_single` over the
tree), and its `clip_grad_norm` takes one norm and one product per parameter: for
nanogpt-char-fast's 76 parameters about 2,100 of the uncompiled training step's 4,200 graph
nodes (`mx.export_to_dot`, MLX 0.32.4). A step run op by op (a GPU's first run, while its
fused kernels compile: `mlx_model.warmup`) pays for every node, and a compiled one
launches a kernel per parameter for each norm and update. Here the gradients are joined
into one float32 vector, clipped by one norm, and AdamW moves one vector of all its
parameters with moments kept as flat vectors (`m`, `v`); Muon's momentum is one flat
vector too, and its Newton-Schulz steps run batched over the matrices of one shape in the
compute dtype. PyTorch's fused AdamW does the same with one kernel over a list of tensors.

Per element the arithmetic is MLX's (`AdamW.apply_single`, `Adam.apply_single` without
bias correction, `Muon.apply_single`), so without clipping the parameters move exactly as
MLX's optimizers move them; with it, the norm's float32 sum runs in another order.

The training step (`mlx_model.train.make_step`) keeps the parameters themselves flat too,
in `master` (`bind`), rather than joining the model's each step: the model computes with
views of it (`compute_leaves`), those the model uses in the compute dtype as they are (its
Linear layers', `for_compute`) cast in one operation, and their gradients come back in
that dtype, joined and cast once (`step_master`). The model's parameters after a step are
float32 views of the new master. The numbers are the joined form's in the same layout,
bit for bit; that layout puts the Linear layers' parameters last among AdamW's, so
against versions before it the clipping norm's float32 sum runs in another order (and
their checkpoints' optimizer state is refused as another layout).
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Muon's quintic iteration (Jordan et al.)


@dataclass(frozen=True)
class Slot:
    """Where one parameter lies in its group's flat vector."""

    path: str
    shape: tuple[int, ...]
    size: int


def newton_schulz(x: mx.array, steps: int) -> mx.array:
    """Muon's quintic iteration towards the orthogonal factor: (N, rows, cols) -> the same,
    for a stack of wide matrices (rows <= cols) of Frobenius norm at most 1."""
    a, b, c = NS_COEFFICIENTS
    for _ in range(steps):
        gram = x @ x.swapaxes(1, 2)  # (N, rows, rows)
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x


class FlatOptimizer(optim.Optimizer):
    """AdamW over every parameter (decay on matrices only), or with `muon_learning_rate`,
    Muon on the parameters `for_muon(path, array)` picks and AdamW on the rest; gradients
    clipped to global norm `grad_clip` first (0: no clipping). Learning rates are floats or
    schedules of the step, as MLX's optimizers take them.

    State (`state`, what a checkpoint keeps): `step`, the learning rates, float32 vectors
    `m` and `v` (AdamW's moments, its parameters in order) and `momentum` (Muon's), and
    `layout`, a digest of the parameters' paths and shapes in that order. Setting `state`
    checks it against the parameters and raises ValueError naming the key that does not
    fit; a gradient of another shape than its parameter raises ValueError too.
    """

    def __init__(
        self,
        learning_rate: float | Callable[[mx.array], mx.array],
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        grad_clip: float = 0.0,
        muon_learning_rate: float | Callable[[mx.array], mx.array] | None = None,
        for_muon: Callable[[str, mx.array], bool] | None = None,
        muon_dtype: mx.Dtype = mx.float32,
        momentum: float = 0.95,
        ns_steps: int = 5,
        for_compute: Callable[[str, mx.array], bool] | None = None,
    ):
        super().__init__()
        if grad_clip < 0:
            raise ValueError(f"grad_clip must be >= 0, got {grad_clip!r}")
        if (muon_learning_rate is None) != (for_muon is None):
            raise ValueError("muon_learning_rate and for_muon go together")
        self._maybe_schedule("learning_rate", learning_rate)
        if muon_learning_rate is not None:
            self._maybe_schedule("muon_learning_rate", muon_learning_rate)
        self.betas, self.eps, self.weight_decay = tuple(betas), eps, weight_decay
        self.grad_clip, self.for_muon, self.muon_dtype = grad_clip, for_muon, muon_dtype
        self.momentum, self.ns_steps = momentum, ns_steps
        self.for_compute = for_compute
        self._adamw: list[Slot] = []
        self._muon: list[Slot] = []
        self._slots: list[Slot] = []  # AdamW's then Muon's: the flat vectors' order
        self._compute_from = 0  # the first slot for_compute picked; they are the suffix
        self._decay: mx.array | None = None  # (A,) bool: AdamW's elements of matrices
        self.master: dict[str, mx.array] = {}  # "flat": the parameters (`bind`)
        self._bound: list[mx.array] = []  # the parameter arrays the master was last of

    def init(self, parameters: dict) -> None:
        """Lay the parameters out and make zero moments where none are set: AdamW's in
        tree order with those `for_compute` picks last, then Muon's in tree order."""
        self._adamw, self._muon, compute = [], [], []
        for path, p in tree_flatten(parameters):
            slot = Slot(path, tuple(p.shape), p.size)
            picked = self.for_compute is not None and self.for_compute(path, p)
            if self.for_muon is not None and self.for_muon(path, p):
                if p.ndim != 2:
                    raise ValueError(f"Muon takes matrices; {path} has shape {p.shape}")
                if self.for_compute is not None and not picked:
                    raise ValueError(f"Muon's {path} must be one for_compute picks")
                self._muon.append(slot)
            else:
                (compute if picked else self._adamw).append(slot)
        plain = len(self._adamw)
        self._adamw += compute
        self._slots = self._adamw + self._muon
        self._compute_from = plain if self.for_compute is not None else len(self._slots)
        decay = [np.full(s.size, len(s.shape) >= 2) for s in self._adamw]
        self._decay = mx.array(np.concatenate(decay)) if decay else None
        for key, length in self._lengths().items():
            if key not in self._state:
                self._state[key] = mx.zeros((length,), mx.float32)
        self._state.setdefault("layout", self._layout())
        self._check(self._state)
        self._initialized = True

    def _layout(self) -> mx.array:
        """(8,) uint32: SHA-256 of the flat vectors' layout (each slot's group, path and
        shape, in order), kept in the state: a checkpoint of the same total size laid out
        otherwise (parameters renamed or reordered) is refused, not resumed shuffled."""
        slots = [("adamw", s.path, s.shape) for s in self._adamw]
        slots += [("muon", s.path, s.shape) for s in self._muon]
        digest = hashlib.sha256(json.dumps(slots).encode()).digest()
        return mx.array(np.frombuffer(digest, dtype=np.uint32))

    def _lengths(self) -> dict[str, int]:
        lengths = {"m": sum(s.size for s in self._adamw), "v": sum(s.size for s in self._adamw)}
        if self.for_muon is not None:
            lengths["momentum"] = sum(s.size for s in self._muon)
        return lengths

    def _check(self, state: dict) -> None:
        layout = state.get("layout")
        if layout is None or not np.array_equal(np.array(layout), np.array(self._layout())):
            raise ValueError("optimizer state 'layout' was written for other parameters")
        for key, length in self._lengths().items():
            value = state.get(key)
            if not isinstance(value, mx.array) or value.shape != (length,):
                found = "none" if value is None else getattr(value, "shape", type(value).__name__)
                raise ValueError(
                    f"optimizer state {key!r} should be a vector of {length}, found {found}"
                )

    @property
    def state(self) -> dict:
        return self._state

    @state.setter
    def state(self, state: dict) -> None:
        """Replace the state in place (a compiled step holds this dict), checked against
        the layout when it is known (after `init`)."""
        if self._initialized:
            self._check(state)
        self._state.clear()
        self._state.update(state)

    def apply_gradients(self, gradients: dict, parameters: dict) -> dict:
        begin_step(self, gradients)
        grads = dict(tree_flatten(gradients))
        params = dict(tree_flatten(parameters))
        slots = self._slots
        if set(grads) != {s.path for s in slots}:
            raise ValueError(
                f"gradients for {sorted(set(grads) ^ {s.path for s in slots})} do not match "
                "the parameters the optimizer was initialised with"
            )
        for s in slots:
            if tuple(grads[s.path].shape) != s.shape:
                raise ValueError(
                    f"the gradient of {s.path} has shape {tuple(grads[s.path].shape)}, "
                    f"its parameter {s.shape}"
                )
        g = _join([grads[s.path] for s in slots])  # (A + M,) float32
        p = self._update(g, _join([params[s.path] for s in slots]))
        new = _split(p, slots, params)
        return tree_unflatten([(path, new[path]) for path, _ in tree_flatten(gradients)])

    def _update(self, g: mx.array, p: mx.array) -> mx.array:
        """The flat (A + M,) float32 parameters `p` moved by the flat gradient `g`."""
        if self.grad_clip > 0:
            norm = mx.sqrt(mx.square(g).sum())
            g = g * mx.minimum(self.grad_clip / (norm + 1e-6), 1.0)
        size = sum(s.size for s in self._adamw)
        parts = [self._adamw_update(g[:size], p[:size])] if self._adamw else []
        if self._muon:
            parts.append(self._muon_update(g[size:], p[size:]))
        return parts[0] if len(parts) == 1 else mx.concatenate(parts)

    def _adamw_update(self, g: mx.array, p: mx.array) -> mx.array:
        """AdamW on the flat (A,) gradient and parameters."""
        b1, b2 = self.betas
        lr = self.learning_rate.astype(mx.float32)
        if self.weight_decay != 0:
            p = mx.where(self._decay, p * (1 - lr * self.weight_decay), p)
        m = b1 * self._state["m"] + (1 - b1) * g
        v = b2 * self._state["v"] + (1 - b2) * mx.square(g)
        self._state["m"], self._state["v"] = m, v
        return p - lr * m / (mx.sqrt(v) + self.eps)

    def _muon_update(self, g: mx.array, p: mx.array) -> mx.array:
        """Muon on the flat (M,) gradient and matrices."""
        mu = self.momentum
        v = mu * self._state["momentum"]
        v = v + (1 - mu) * g
        self._state["momentum"] = v
        u = g * (1 - mu) + v * mu  # Nesterov
        groups = defaultdict(list)  # wide shape -> [(slot, tall, wide matrix)]
        for slot, piece in zip(self._muon, _pieces(u, self._muon), strict=True):
            tall = slot.shape[0] > slot.shape[1]
            groups[piece.T.shape if tall else piece.shape].append(
                (slot, tall, piece.T if tall else piece)
            )
        lr = self.state["muon_learning_rate"].astype(mx.float32)
        steps = {}
        for members in groups.values():
            x = mx.stack([w for *_, w in members]).astype(mx.float32)  # (N, rows, cols)
            x = x / (mx.sqrt((x * x).sum(axis=(1, 2), keepdims=True)) + 1e-7)
            x = newton_schulz(x.astype(self.muon_dtype), self.ns_steps)
            for (slot, tall, _), o in zip(members, x, strict=True):
                scale = max(1, slot.shape[0] / slot.shape[1]) ** 0.5
                steps[slot.path] = (lr * scale) * (o.T if tall else o).astype(mx.float32)
        return p - mx.concatenate([steps[s.path].reshape(-1) for s in self._muon])

    # The training step's own form (`mlx_model.train.make_step`): the parameters live
    # flat in `master`, not joined from the model's each step; the model computes with
    # views of it, those `for_compute` picks cast to the compute dtype in one operation,
    # and its gradients come back in that dtype, to be joined and cast once.

    def bind(self, parameters: dict) -> None:
        """Take `parameters` (the model's trainable ones, the tree `init` laid out) as the
        flat float32 master the training step moves; `master` keeps its dict (a compiled
        step holds it)."""
        params = dict(tree_flatten(parameters))
        self.master["flat"] = _join([params[s.path] for s in self._slots])
        self._bound = [params[s.path] for s in self._slots]

    @property
    def paths(self) -> list[str]:
        """The parameters' paths in the flat vectors' order."""
        return [s.path for s in self._slots]

    def is_bound(self, arrays: list[mx.array]) -> bool:
        """Whether `arrays` (the model's parameters in `paths` order) are the ones the
        master was last bound to or moved into, not replaced since (as loading a
        checkpoint replaces them)."""
        return len(arrays) == len(self._bound) and all(
            a is b for a, b in zip(arrays, self._bound, strict=True)
        )

    def parameter_views(self, flat: mx.array) -> dict[str, mx.array]:
        """The float32 parameters by path, as views of the flat vector (no copies)."""
        return _by_path(flat, self._slots)

    def compute_leaves(self, flat: mx.array, dtype: mx.Dtype) -> dict[str, mx.array]:
        """The parameters as the model computes with them, by path: those `for_compute`
        picks (the suffix of the layout) cast to `dtype` in one operation, the rest float32
        views."""
        plain, cast = self._slots[: self._compute_from], self._slots[self._compute_from :]
        offset = sum(s.size for s in plain)
        leaves = _by_path(flat[:offset], plain) if plain else {}
        if cast:
            leaves |= _by_path(flat[offset:].astype(dtype), cast)
        return leaves

    def mark(self, arrays: list[mx.array]) -> None:
        """Record `arrays` (the model's parameters in `paths` order, after a step moved
        them) as the ones the master holds, for `is_bound`."""
        self._bound = list(arrays)

    def step_master(self, gradients: dict, reduce: Callable | None = None) -> dict:
        """One step of the master with `gradients` by path (those of `compute_leaves`, in
        their dtypes): joined (the compute dtype's joined first, then cast once), passed
        through `reduce` (the data-parallel average) if given, the update applied; returns
        the new float32 parameters by path (`parameter_views`)."""
        begin_step(self, gradients)
        plain, cast = self._slots[: self._compute_from], self._slots[self._compute_from :]
        parts = [gradients[s.path].reshape(-1).astype(mx.float32) for s in plain]
        if cast:
            rest = mx.concatenate([gradients[s.path].reshape(-1) for s in cast])
            parts.append(rest.astype(mx.float32))
        g = mx.concatenate(parts)  # (A + M,) float32
        if reduce is not None:
            g = reduce(g)
        self.master["flat"] = self._update(g, self.master["flat"])
        return self.parameter_views(self.master["flat"])


def begin_step(optimizer: optim.Optimizer, gradients: dict) -> None:
    """What MLX's `Optimizer.apply_gradients` does before its per-parameter updates: state
    made on first use, the scheduled values (learning rates) at this step, the step
    counted."""
    if not optimizer._initialized:
        optimizer.init(gradients)
    for name, scheduler in optimizer._schedulers.items():
        optimizer.state[name] = scheduler(optimizer.step)
    optimizer.state["step"] = optimizer.step + 1


def _join(arrays: list[mx.array]) -> mx.array:
    """The arrays flattened and joined, as one float32 vector."""
    return mx.concatenate([a.reshape(-1) for a in arrays]).astype(mx.float32)


def _pieces(flat: mx.array, slots: list[Slot]) -> list[mx.array]:
    """`flat` cut back into the slots' shapes."""
    offsets = np.cumsum([s.size for s in slots])[:-1].tolist()
    return [piece.reshape(s.shape) for s, piece in zip(slots, mx.split(flat, offsets), strict=True)]


def _by_path(flat: mx.array, slots: list[Slot]) -> dict[str, mx.array]:
    """`flat` cut back into the slots' shapes (views), by path."""
    return {s.path: piece for s, piece in zip(slots, _pieces(flat, slots), strict=True)}


def _split(flat: mx.array, slots: list[Slot], params: dict) -> dict:
    """`flat` cut back into the slots' shapes, in their parameters' dtypes, by path."""
    return {path: piece.astype(params[path].dtype) for path, piece in _by_path(flat, slots).items()}
