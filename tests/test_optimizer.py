"""The joined optimizer (`mlx_model.optimizer.FlatOptimizer`): the same updates as MLX's
per-parameter optimizers, its state checked, and training with it resuming exactly."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_model import ops
from mlx_model.config import TINY
from mlx_model.data import Vocab, split_tokens
from mlx_model.optimizer import FlatOptimizer
from mlx_model.train import AdamWMatrices, make_optimizer, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

SHAPES = {  # a block's matrices (tall, wide, two square), a bias, embeddings, a norm
    "h": {"w": (48, 16), "u": (16, 48), "s": [(16, 16), (16, 16)], "b": (16,)},
    "wte": (10, 16),
    "ln": (16,),
}


def in_blocks(path: str, p: mx.array) -> bool:
    return path.startswith("h.") and p.ndim == 2


def random_tree(key, shapes=SHAPES, scale: float = 1.0):
    if isinstance(shapes, dict):
        return {k: random_tree(key, v, scale) for k, v in shapes.items()}
    if isinstance(shapes, list):
        return [random_tree(key, v, scale) for v in shapes]
    return scale * mx.random.normal(shapes, key=next(key))


def run(optimizer, steps: int = 3, grad_scale: float = 1.0) -> dict[str, np.ndarray]:
    """The parameters after `steps` updates from fixed random parameters and gradients."""
    key = iter(mx.random.split(mx.random.key(0), 64))
    params = random_tree(key)
    for _ in range(steps):
        params = optimizer.apply_gradients(random_tree(key, scale=grad_scale), params)
    return {k: np.array(v) for k, v in tree_flatten(params)}


def test_adamw_moves_every_parameter_exactly_as_mlx_does():
    """Decay on matrices only, Adam on vectors: bit for bit MLX's AdamW and Adam, and the
    moments are theirs joined in the parameters' order."""
    ours = FlatOptimizer(0.1, betas=(0.9, 0.99), weight_decay=0.5)
    mlx_ = optim.MultiOptimizer(
        [optim.AdamW(0.1, betas=[0.9, 0.99], weight_decay=0.5), optim.Adam(0.1, betas=[0.9, 0.99])],
        [lambda path, p: p.ndim >= 2],
    )
    a, b = run(ours), run(mlx_)
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    theirs = {}
    for state in mlx_.state["states"]:
        theirs.update(dict(tree_flatten(state)))
    joined_m = np.concatenate([np.array(theirs[f"{n}.m"]).reshape(-1) for n in a])
    np.testing.assert_array_equal(np.array(ours.state["m"]), joined_m)


def test_weight_decay_skips_vectors_as_the_per_parameter_form_does():
    ours, theirs = FlatOptimizer(0.1, weight_decay=0.5), AdamWMatrices(0.1, weight_decay=0.5)
    params = {"w": mx.ones((2, 2)), "b": mx.ones((2,))}
    grads = {"w": mx.zeros((2, 2)), "b": mx.zeros((2,))}
    for opt in (ours, theirs):
        new = opt.apply_gradients(grads, params)
        assert float(new["b"][0]) == 1.0  # zero gradient, no decay
        assert float(new["w"][0, 0]) == pytest.approx(1.0 - 0.1 * 0.5)


def test_muon_moves_the_matrices_as_mlx_muon_does():
    """Muon on the blocks' matrices (float32 Newton-Schulz), AdamW on the rest."""
    ours = FlatOptimizer(0.1, muon_learning_rate=0.02, for_muon=in_blocks)
    mlx_ = optim.MultiOptimizer(
        [optim.Muon(0.02, weight_decay=0.0), optim.AdamW(0.1, weight_decay=0.0)], [in_blocks]
    )
    a, b = run(ours), run(mlx_)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-6, err_msg=name)
    assert not np.allclose(a["h.w"], run(FlatOptimizer(0.1))["h.w"], atol=1e-3)  # not AdamW's


@pytest.mark.parametrize("grad_scale", [0.01, 10.0])
def test_clipping_matches_mlx_clip_grad_norm(grad_scale):
    """Global-norm clipping to 1.0: exactly MLX's where the norm is under it (the factor
    is 1), within float32 rounding of the norm's sum where it clips."""

    class Clipped(optim.MultiOptimizer):
        def apply_gradients(self, gradients, parameters):
            return super().apply_gradients(optim.clip_grad_norm(gradients, 1.0)[0], parameters)

    ours = FlatOptimizer(0.1, weight_decay=0.1, grad_clip=1.0)
    mlx_ = Clipped([AdamWMatrices(0.1, weight_decay=0.1)])
    a, b = run(ours, grad_scale=grad_scale), run(mlx_, grad_scale=grad_scale)
    unclipped = run(FlatOptimizer(0.1, weight_decay=0.1), grad_scale=grad_scale)
    for name in a:
        if grad_scale < 1:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
        else:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert (grad_scale < 1) == all(np.array_equal(a[n], unclipped[n]) for n in a)


def test_state_of_another_layout_is_refused_naming_the_key():
    ours = FlatOptimizer(0.1, muon_learning_rate=0.02, for_muon=in_blocks)
    ours.init(random_tree(iter(mx.random.split(mx.random.key(1), 16))))
    good = dict(ours.state)
    with pytest.raises(ValueError, match=r"'momentum' should be a vector of 2048, found none"):
        ours.state = {k: v for k, v in good.items() if k != "momentum"}
    with pytest.raises(ValueError, match=r"'m' should be a vector of 192, found \(3,\)"):
        ours.state = {**good, "m": mx.zeros((3,))}
    ours.state = good  # the right layout is taken
    with pytest.raises(ValueError, match=r"Muon takes matrices; h.b has shape \(16,\)"):
        FlatOptimizer(0.1, muon_learning_rate=0.02, for_muon=lambda *_: True).init(
            {"h": {"b": mx.zeros((16,))}}
        )


def test_make_optimizer_joins_where_the_backend_asks():
    tc = TINY.train.replace(optimizer="muon")
    with ops.use("gpu"):
        assert isinstance(make_optimizer(tc), FlatOptimizer)
    with ops.use("reference"):
        assert isinstance(make_optimizer(tc), optim.MultiOptimizer)
    assert not isinstance(make_optimizer(TINY.train, joined=False), FlatOptimizer)


def graph_nodes(outputs: list[mx.array]) -> int:
    path = "/tmp/optimizer-graph.dot"
    mx.export_to_dot(path, *outputs)
    with open(path) as f:
        return len(re.findall(r'label ="[A-Z]', f.read()))


def test_the_joined_update_is_a_few_operations_not_a_few_per_parameter():
    """What the joined form exists for: nanogpt-char's 76 parameters move in under a
    quarter of the graph nodes MLX's per-parameter AdamW and clipping take."""
    from mlx_model.config import NANOGPT_CHAR
    from mlx_model.model import GPT

    tc = NANOGPT_CHAR.train
    params = GPT(NANOGPT_CHAR.model.replace(vocab_size=65)).trainable_parameters()
    grads = {k: v for k, v in params.items()}
    mx.eval(params)
    counts = {}
    for joined in (True, False):
        opt = make_optimizer(tc, joined=joined)
        opt.init(params)
        mx.eval(opt.state)
        g = grads if joined else optim.clip_grad_norm(grads, tc.grad_clip)[0]
        new = opt.apply_gradients(g, params)
        counts[joined] = graph_nodes([v for _, v in tree_flatten((new, opt.state))])
    assert counts[True] * 4 < counts[False], counts


@pytest.fixture(scope="module")
def splits(corpus_path):
    text = corpus_path.read_text()[:200_000]
    return split_tokens(Vocab.from_text(text).encode(text), 0.1)


@pytest.mark.parametrize("recipe", ["adamw", "muon"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # bfloat16: the master's step
def test_training_with_it_learns_and_resumes_exactly(splits, tmp_path, recipe, dtype):
    """The GPU's backend (here on the CPU) trains with the joined optimizer, compiled; a
    stopped run resumes from its checkpoint to the uninterrupted run's numbers."""
    train_ids, val_ids = splits
    cfg = TINY.model.replace(vocab_size=65, dropout=0.1)
    tc = TINY.train.replace(optimizer=recipe, muon_learning_rate=0.02, compute_dtype=dtype)
    with ops.use("gpu"):
        full = train(cfg, tc, train_ids, val_ids, tmp_path / "full")
        train(cfg, tc, train_ids, val_ids, tmp_path / "resumed", stop_after=20)
        second = train(cfg, tc, train_ids, val_ids, tmp_path / "resumed")
    assert full.history[-1]["val_loss"] < full.history[0]["val_loss"] - 0.3
    assert second.resumed_from == 20
    assert [h["val_loss"] for h in second.history] == [h["val_loss"] for h in full.history]


@pytest.mark.parametrize("first, then", [("reference", "gpu"), ("gpu", "reference")])
def test_a_checkpoint_of_the_other_layout_restarts_the_run(splits, tmp_path, first, then):
    """A checkpoint whose optimizer state the other layout wrote is not resumed: the run
    warns and starts over. (MLX's per-parameter AdamW had taken the joined one's state and
    resumed with zero moments beside the saved ones.)"""
    train_ids, val_ids = splits
    cfg = TINY.model.replace(vocab_size=65)
    with ops.use(first):
        train(cfg, TINY.train, train_ids, val_ids, tmp_path / "run", stop_after=20)
    with ops.use(then), pytest.warns(UserWarning, match=r"optimizer.safetensors does not fit"):
        again = train(cfg, TINY.train, train_ids, val_ids, tmp_path / "run")
    assert again.resumed_from is None


def test_a_gradient_of_another_shape_or_a_state_laid_out_otherwise_is_refused():
    """Joined into one vector, a (3, 4) gradient for a (4, 3) matrix would move the
    matrix shuffled, and moments saved for parameters renamed or reordered (the same
    total size) would land on the wrong ones: both are refused, naming what differs."""
    params = {"a": mx.zeros((4, 3)), "b": mx.zeros((3,))}
    ours = FlatOptimizer(0.1)
    ours.init(params)
    with pytest.raises(
        ValueError, match=r"gradient of a has shape \(3, 4\), its parameter \(4, 3\)"
    ):
        ours.apply_gradients({"a": mx.zeros((3, 4)), "b": mx.zeros((3,))}, params)
    other = FlatOptimizer(0.1)
    other.init({"b": mx.zeros((3,)), "c": mx.zeros((4, 3))})  # 15 elements too
    assert other.state["m"].shape == ours.state["m"].shape
    with pytest.raises(ValueError, match="'layout' was written for other parameters"):
        ours.state = dict(other.state)


def _steps(recipe: str, master: bool, compiled: bool, replace_after: int | None = None):
    """Losses and float32 parameters after 6 steps of the gpu backend's bfloat16 training
    step on fixed windows, with the parameters kept flat in the optimizer (`master`) or
    joined from the model's each step, in the same layout; `replace_after`: the model's
    parameters replaced (by another model's) after that many steps."""
    from mlx_model.model import GPT
    from mlx_model.train import make_step

    cfg = TINY.model.replace(vocab_size=65, dropout=0.1)
    tc = TINY.train.replace(compute_dtype="bfloat16", optimizer=recipe, muon_learning_rate=0.02)
    w = np.random.default_rng(0).integers(0, 65, (tc.batch_size, cfg.block_size + 1))
    x, y = mx.array(w[:, :-1], dtype=mx.int32), mx.array(w[:, 1:], dtype=mx.int32)
    with ops.use("gpu"):
        mx.random.seed(1)
        other = GPT(cfg).trainable_parameters()
        mx.random.seed(0)
        model = GPT(cfg)
        model.train()
        opt = make_optimizer(tc)
        opt.init(model.trainable_parameters())  # the master's layout either way
        if not master:
            opt.for_compute = None  # make_step then joins the model's parameters each step
        step = make_step(model, opt, tc, mx.bfloat16, compiled=compiled)
        binds, bind = [], opt.bind
        opt.bind = lambda params: binds.append(1) or bind(params)
        losses = []
        for i in range(6):
            if i == replace_after:
                model.update(other)
            mx.random.seed(i)
            losses.append(step(x, y).item())
    # the master is taken from the model again only when its parameters were replaced
    assert len(binds) == (master and replace_after is not None)
    return losses, {k: np.array(v) for k, v in tree_flatten(model.parameters())}


@pytest.mark.parametrize("recipe", ["adamw", "muon"])
def test_the_master_step_moves_the_parameters_as_the_joined_step_does(recipe):
    """Bit for bit, compiled or not, and after parameters replaced between steps."""
    want_losses, want = _steps(recipe, master=False, compiled=False)
    for compiled in (False, True):
        losses, got = _steps(recipe, master=True, compiled=compiled)
        assert losses == want_losses
        assert all(v.dtype == np.float32 and np.array_equal(v, want[k]) for k, v in got.items())
    losses, got = _steps(recipe, master=True, compiled=True, replace_after=3)
    want_losses, want = _steps(recipe, master=False, compiled=False, replace_after=3)
    assert losses == want_losses and losses[3] != _steps(recipe, False, False)[0][3]
    assert all(np.array_equal(v, want[k]) for k, v in got.items())


def test_the_master_step_casts_and_joins_once_not_per_parameter():
    """What it exists for: in the graph of one step of nanogpt-char's model, the
    parameters' casts and joins are a few, not two or three per parameter (counted by
    `bench/step_graph.py`)."""
    from step_graph import graph_counts

    from mlx_model.config import NANOGPT_CHAR
    from mlx_model.model import GPT

    cfg = NANOGPT_CHAR.model.replace(vocab_size=65, n_layer=2, block_size=16)
    found = graph_counts(cfg, NANOGPT_CHAR.train.replace(batch_size=2), "gpu")
    counts = {False: found["joined"], True: found["master"]}
    model = GPT(cfg)
    n = len(tree_flatten(model.trainable_parameters()))
    linear = 4 * cfg.n_layer * 2  # four Linear layers a block, a weight and a bias each
    assert counts[True]["casts"] <= counts[False]["casts"] - 2 * linear + 2, counts
    assert counts[True]["arrays joined"] <= counts[False]["arrays joined"] - n + 2, counts
