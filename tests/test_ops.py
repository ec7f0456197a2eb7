"""The ops boundary: which backend runs, and that every backend computes the reference's
functions (outputs and gradients), in training and in inference."""

from __future__ import annotations

import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_model import ops
from mlx_model.config import GPTConfig
from mlx_model.model import GPT


def lane_loss(model: GPT, x: mx.array, y: mx.array) -> mx.array:
    """The mean loss as the training step computes it: the batch in the backend's lanes."""
    return ops.loss(model, x, y).mean()


FAST = ["cpu"] + (["native"] if sys.platform.startswith("linux") else [])


def test_backend_is_chosen_per_dtype_and_setting(monkeypatch):
    monkeypatch.delenv(ops.ENV, raising=False)
    assert ops.backend(mx.bfloat16, True).name == "reference"
    assert ops.backend(mx.float32, True).name == FAST[-1]  # auto: native where it builds
    for name in ("reference", "gpu", *FAST):
        with ops.use(name):
            assert ops.backend(mx.float32, True).name == name
            assert ops.backend(mx.float16, False).name == ("gpu" if name == "gpu" else "reference")
    monkeypatch.setenv(ops.ENV, "cpu")
    assert ops.backend(mx.float32, False).name == "cpu"
    with ops.use("reference"):  # the innermost setting wins
        assert ops.backend(mx.float32, False).name == "reference"
    monkeypatch.setenv(ops.ENV, "fastest")
    with pytest.raises(ValueError, match="SHAKESPEARE_GPT_OPS must be one of .* got 'fastest'"):
        ops.backend(mx.float32, True)


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match="unknown ops backend 'tpu'"):
        with ops.use("tpu"):
            pass
    with pytest.raises(ValueError, match="lanes must be a whole number >= 1, got 0"):
        with ops.use(lanes=0):
            pass


def test_signature_names_what_changes_the_numbers():
    with ops.use("cpu", lanes=1):
        one = ops.signature("float32")
    with ops.use("cpu", lanes=2):
        two = ops.signature("float32")
    with ops.use("reference"):
        ref = ops.signature("float32")
    assert one["backend"] == "cpu" and one["lanes"] == 1 and two["lanes"] == 2
    assert ref["backend"] == "reference" and ref["lanes"] == 1
    assert len({str(s) for s in (one, two, ref)}) == 3


def _grads(fn, *args):
    return mx.grad(lambda *a: (fn(*a) * mx.cos(fn(*a))).sum(), argnums=tuple(range(len(args))))(
        *args
    )


@pytest.mark.parametrize("name", FAST)
@pytest.mark.parametrize("training", [True, False])
def test_each_op_matches_the_reference(name, training):
    mx.random.seed(0)
    x = mx.random.normal((3, 40, 24)) * 2
    w, b = mx.random.normal((24,)), mx.random.normal((24,))
    qkv = mx.random.normal((3, 40, 72))
    cases = {
        "layer_norm": (lambda x, w, b: ops.layer_norm(x, w, b, 1e-5, training), (x, w, b)),
        "gelu": (lambda x: ops.gelu(x, training), (x,)),
        "dropout 0": (lambda x: ops.dropout(x, 0.0, training), (x,)),
        "attention": (lambda qkv: ops.causal_attention(qkv, 4, 0.0, training), (qkv,)),
    }
    for what, (fn, args) in cases.items():
        with ops.use("reference"):
            ref = fn(*args)
        with ops.use(name):
            out = fn(*args)
        assert mx.abs(out - ref).max().item() < 2e-5, what
        if not training:  # inference forms have no backward (the exp is built from bits)
            continue
        with ops.use("reference"):
            ref_grads = _grads(fn, *args)
        with ops.use(name):
            grads = _grads(fn, *args)
        for g, r in zip(grads, ref_grads, strict=True):
            assert mx.abs(g - r).max().item() < 5e-5 * max(1.0, mx.abs(r).max().item()), what


@pytest.mark.parametrize("name", ["reference", *FAST])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_dropout_keeps_the_expected_share_and_scale(name, dtype):
    x = mx.ones((200, 500), dtype)
    with ops.use(name):
        mx.random.seed(1)
        y = np.array(ops.dropout(x, 0.2, True).astype(mx.float32))
    assert abs((y == 0).mean() - 0.2) < 0.01
    assert np.allclose(y[y != 0], 1 / 0.8, rtol=1e-2)  # bfloat16 rounds 1.25 exactly
    with ops.use(name):
        assert ops.dropout(x, 0.2, False) is x  # identity outside training


@pytest.mark.parametrize("lanes", [1, 2])
def test_the_model_computes_the_same_loss_and_gradients_on_every_backend(lanes):
    cfg = GPTConfig(vocab_size=11, block_size=40, n_layer=2, n_head=2, n_emb=16, dropout=0.0)
    mx.random.seed(3)
    model = GPT(cfg)
    idx = mx.array(np.random.default_rng(1).integers(0, 11, (5, 40)), dtype=mx.int32)
    y = mx.array(np.random.default_rng(2).integers(0, 11, (5, 40)), dtype=mx.int32)
    results = {}
    for name in ("reference", "gpu", *FAST):
        with ops.use(name, lanes):
            loss, grads = nn.value_and_grad(model, lane_loss)(model, idx, y)
            results[name] = (loss.item(), dict(tree_flatten(grads)))
    ref_loss, ref_grads = results.pop("reference")
    for name, (loss, grads) in results.items():
        assert abs(loss - ref_loss) < 1e-5, name
        for key, g in grads.items():
            assert mx.allclose(g, ref_grads[key], atol=1e-5).item(), (name, key)


def _primitives(*arrays: mx.array) -> str:
    """The names of the primitives that compute `arrays`, as MLX's graph export writes them."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "graph.dot"
        mx.export_to_dot(str(path), *arrays)
        return path.read_text()


def test_the_gpu_backend_trains_without_gathers_or_scatters():
    """MLX's CUDA backend compiles each gather and scatter kernel at first use; the gpu
    backend's step has none (the reference's has all four), and computes the same loss."""
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_emb=16, dropout=0.0)
    mx.random.seed(0)
    model = GPT(cfg)
    rng = np.random.default_rng(0)
    x, y = (mx.array(rng.integers(0, 11, (2, 8)), dtype=mx.int32) for _ in range(2))
    graphs, losses = {}, {}
    for name in ("reference", "gpu"):
        with ops.use(name):
            loss, grads = nn.value_and_grad(model, lane_loss)(model, x, y)
            graphs[name] = _primitives(loss, *(g for _, g in tree_flatten(grads)))
            losses[name] = loss.item()
    for primitive in ("Gather", "Scatter", "GatherAxis", "ScatterAxis"):
        assert primitive in graphs["reference"]
        assert primitive not in graphs["gpu"], primitive
    assert abs(losses["gpu"] - losses["reference"]) < 1e-5


def test_the_gpu_backends_embedding_rounds_once_to_the_compute_dtype():
    mx.random.seed(1)
    wte, wpe = mx.random.normal((13, 8)), mx.random.normal((6, 8))
    ids = mx.array([[0, 12, 5, 5, 7, 1]], dtype=mx.int32)
    with ops.use("gpu"):
        x32 = ops.embed(ids, wte, wpe, True)
        x16 = ops.embed(ids, wte, wpe, True, mx.bfloat16)
    assert mx.array_equal(x32, wte[ids] + wpe).item()  # one term: the product is exact
    assert x16.dtype == mx.bfloat16
    want = wte[ids].astype(mx.bfloat16) + wpe.astype(mx.bfloat16)
    assert mx.array_equal(x16, want).item()
    big = mx.zeros((2000, 8))  # above ONE_HOT_MAX_VOCAB: the gather, same values
    with ops.use("gpu"):
        assert mx.array_equal(ops.embed(ids, big, wpe, True), wpe[None]).item()


def _bf16_ulp(x: np.ndarray) -> np.ndarray:
    """bfloat16's spacing at |x| (8 significant bits)."""
    return 2.0 ** (np.floor(np.log2(np.maximum(np.abs(x), 1e-30))) - 7)


def test_the_gpu_backends_gelu_in_half_precision_rounds_once():
    """GPT-2's GELU and its derivative in bfloat16 training: within half an ulp (plus
    float32's error) of the float64 values (MLX's `nn.gelu_approx` rounds every
    operation to bfloat16)."""
    import math

    rng = np.random.default_rng(0)
    x = mx.array(rng.normal(0, 3, (64, 384)).astype(np.float32)).astype(mx.bfloat16)
    g = mx.array(rng.normal(0, 1, (64, 384)).astype(np.float32)).astype(mx.bfloat16)
    xd, gd = (np.array(a.astype(mx.float32), dtype=np.float64) for a in (x, g))
    k, c = math.sqrt(2 / math.pi), 0.044715
    t = np.tanh(k * (xd + c * xd**3))
    want_y = 0.5 * xd * (1 + t)
    want_dx = gd * (0.5 * (1 + t) + 0.5 * xd * (1 - t * t) * k * (1 + 3 * c * xd * xd))
    with ops.use("gpu"):
        (y,), (dx,) = mx.vjp(lambda x: ops.gelu(x, True), [x], [g])
    assert y.dtype == dx.dtype == mx.bfloat16
    for got, want in ((y, want_y), (dx, want_dx)):
        err = np.abs(np.array(got.astype(mx.float32), dtype=np.float64) - want)
        assert (err <= 0.51 * _bf16_ulp(np.maximum(np.abs(want), 1e-3))).all()
    with ops.use("gpu"):  # the same function in evaluation: a loss estimate computes training's
        assert mx.array_equal(ops.gelu(x, False), ops.gelu(x, True)).item()


def test_the_gpu_backends_linear_sums_the_bias_gradient_over_the_batch_in_two_steps():
    """In training the gpu backend's x W^T + b is MLX's addmm with its own gradient, whose
    bias part sums over T and then B (`ops.gpu.batch_sum`): the same values as the
    reference's, for 3-D inputs; 2-D inputs take the reference's."""
    from mlx_model.ops.gpu import batch_sum

    mx.random.seed(2)
    x, w, b = mx.random.normal((4, 33, 12)), mx.random.normal((20, 12)), mx.random.normal((20,))
    g = mx.random.normal((4, 33, 20))
    assert mx.allclose(batch_sum(g), g.sum(axis=(0, 1)), atol=1e-5).item()
    assert mx.allclose(batch_sum(g[0]), g[0].sum(axis=0), atol=1e-5).item()
    for xs in (x, x[0]):
        outs = {}
        for name in ("reference", "gpu"):
            with ops.use(name):
                fn = lambda x, w, b: ops.linear(x, w, b, True)  # noqa: E731
                outs[name] = (fn(xs, w, b), *_grads(fn, xs, w, b))
        for got, want in zip(outs["gpu"], outs["reference"], strict=True):
            assert got.shape == want.shape
            assert mx.allclose(got, want, atol=1e-4, rtol=1e-5).item()
    with ops.use("gpu"):  # bfloat16 compute from float32 weights: gradients come back float32
        dx, dw, db = _grads(lambda x, w, b: ops.linear(x, w, b, True), x.astype(mx.bfloat16), w, b)
    assert dx.dtype == mx.bfloat16 and dw.dtype == db.dtype == mx.float32
    sums = {}  # the bias's gradient: one sum over B and T in the reference, two in the gpu's
    for name in ("reference", "gpu"):
        with ops.use(name):
            db = mx.grad(lambda b: ops.linear(x, w, b, True).sum())(b)
        sums[name] = _primitives(db).count('label ="Sum"')
    assert sums == {"reference": 1, "gpu": 2}
