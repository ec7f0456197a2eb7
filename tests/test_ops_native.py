"""The native CPU primitives (mlx_model/ops/csrc/cpu_kernels.cpp, built by mlx_model.ops.native)."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from mlx_model import ops
from mlx_model.config import GPTConfig
from mlx_model.generate import generate
from mlx_model.model import GPT
from mlx_model.ops import cpu as fastops
from mlx_model.ops import native

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="built on Linux")


@pytest.fixture(scope="module")
def ext():
    module = native.load()
    assert module is not None, "the fused attention did not build here (see the warning)"
    return module


def reference(qkv: mx.array, seed: mx.array, heads: int, p: float) -> mx.array:
    """Plain-MLX causal attention with the primitive's documented dropout masks."""
    B, T, C3 = qkv.shape
    D = C3 // 3 // heads
    q, k, v = (t.reshape(B, T, heads, D).transpose(0, 2, 1, 3) for t in mx.split(qkv, 3, -1))
    scores = (q / math.sqrt(D)) @ k.transpose(0, 1, 3, 2)
    future = mx.arange(T)[None, :] > mx.arange(T)[:, None]
    w = mx.softmax(mx.where(future, -mx.inf, scores), axis=-1, precise=True)
    if p > 0:
        index = mx.arange(w.size, dtype=mx.uint32).reshape(w.shape)
        keep = fastops._hash32(index + seed * 0x9E3779B9) >= round(p * 2**32)
        w = mx.where(keep, w / (1 - p), 0.0)
    return (w @ v).transpose(0, 2, 1, 3).reshape(B, T, C3 // 3)


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(3, 70, 2, 8), (2, 128, 4, 32), (1, 1, 1, 4), (2, 33, 3, 5)])
def test_output_and_gradient_match_plain_mlx(ext, shape, p):
    B, T, H, D = shape
    mx.random.seed(0)
    qkv = mx.random.normal((B, T, 3 * H * D)) * 2
    seed = mx.array([987654321], dtype=mx.uint32)
    ct = mx.random.normal((B, T, H * D))
    y = ext.causal_attention(qkv, seed, H, 1 / math.sqrt(D), p)
    assert mx.abs(y - reference(qkv, seed, H, p)).max().item() < 2e-5
    grad = mx.grad(lambda x: (ext.causal_attention(x, seed, H, 1 / math.sqrt(D), p) * ct).sum())
    ref_grad = mx.grad(lambda x: (reference(x, seed, H, p) * ct).sum())(qkv)
    assert mx.abs(grad(qkv) - ref_grad).max().item() < 5e-5 * max(
        1.0, mx.abs(ref_grad).max().item()
    )
    compiled = mx.compile(grad)
    assert mx.abs(compiled(qkv) - ref_grad).max().item() < 5e-5 * max(
        1.0, mx.abs(ref_grad).max().item()
    )


def test_dropout_follows_the_seed(ext):
    qkv = mx.random.normal((2, 40, 3 * 16))
    one, two = mx.array([1], dtype=mx.uint32), mx.array([2], dtype=mx.uint32)
    a = ext.causal_attention(qkv, one, 2, 0.35, 0.5)
    assert mx.array_equal(a, ext.causal_attention(qkv, one, 2, 0.35, 0.5)).item()
    assert not mx.allclose(a, ext.causal_attention(qkv, two, 2, 0.35, 0.5)).item()
    # the kept weights are scaled by 1/(1-p): averaged over many masks, no dropout
    mean = (
        sum(
            ext.causal_attention(qkv, mx.array([s], dtype=mx.uint32), 2, 0.35, 0.5)
            for s in range(400)
        )
        / 400
    )
    plain = ext.causal_attention(qkv, one, 2, 0.35, 0.0)
    assert mx.abs(mean - plain).mean().item() < 0.05 * mx.abs(plain).mean().item()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (((2, 4, 10), "uint32", 2, 0.0), "qkv must be \\(B, T, 3 \\* heads \\* head_dim\\)"),
        (((2, 4, 12), "float16", 2, 0.0), "qkv must be float32, got float16"),
        (((2, 4, 12), "int32seed", 2, 0.0), "seed must be a uint32 array of one element"),
        (((2, 4, 12), "uint32", 2, 1.0), "dropout p must be in \\[0, 1\\), got 1"),
        (((2, 4, 12), "uint32", 0, 0.0), "heads must be >= 1, got 0"),
    ],
)
def test_bad_inputs_are_named(ext, args, message):
    shape, kind, heads, p = args
    qkv = mx.zeros(shape, mx.float16 if kind == "float16" else mx.float32)
    seed = mx.zeros((1,), mx.int32 if kind == "int32seed" else mx.uint32)
    with pytest.raises(ValueError, match=message):
        ext.causal_attention(qkv, seed, heads, 1.0, p)


def test_gelu_and_its_gradient_match_gpt2_gelu(ext):
    extremes = mx.array([0.0, -0.0, 1e-30, -12.0, -100.0, 100.0, -1e4, 1e4, 3.0, -3.0])
    x = mx.concatenate([mx.random.normal((10_000,)) * 4, extremes]).reshape(-1, 10)
    assert mx.abs(ext.gelu(x) - nn.gelu_approx(x)).max().item() < 5e-6
    ct = mx.random.normal(x.shape)
    g = mx.grad(lambda t: (ext.gelu(t) * ct).sum())(x)
    g_ref = mx.grad(lambda t: (nn.gelu_approx(t) * ct).sum())(x)
    assert mx.abs(g - g_ref).max().item() < 2e-5
    assert mx.abs(mx.compile(mx.grad(lambda t: (ext.gelu(t) * ct).sum()))(x) - g_ref).max() < 2e-5


@pytest.mark.parametrize("shape", [(4, 7, 128), (3, 37), (1, 5)])
def test_layer_norm_and_its_gradients_match_mlx(ext, shape):
    x = mx.random.normal(shape) * 3 + 1
    w, b = mx.random.normal(shape[-1:]), mx.random.normal(shape[-1:])
    ct = mx.random.normal(shape)
    ref = mx.fast.layer_norm(x, w, b, 1e-5)
    assert mx.abs(ext.layer_norm(x, w, b, 1e-5) - ref).max().item() < 1e-5

    def loss(fn):
        return lambda x, w, b: (fn(x, w, b, 1e-5) * ct).sum()

    grads = mx.grad(loss(ext.layer_norm), argnums=(0, 1, 2))(x, w, b)
    refs = mx.grad(loss(mx.fast.layer_norm), argnums=(0, 1, 2))(x, w, b)
    for g, r, name in zip(grads, refs, ("x", "weight", "bias"), strict=True):
        assert mx.abs(g - r).max().item() < 2e-5 * max(1.0, mx.abs(r).max().item()), name


def test_gelu_and_layer_norm_name_bad_inputs(ext):
    with pytest.raises(ValueError, match="x must be float32, got float16"):
        ext.gelu(mx.zeros((3,), mx.float16))
    ones = mx.ones((4,))
    with pytest.raises(ValueError, match=r"weight and bias of shape \(C,\) .* got x \(2,3\)"):
        ext.layer_norm(mx.zeros((2, 3)), ones, ones, 1e-5)
    with pytest.raises(ValueError, match="eps must be > 0, got 0"):
        ext.layer_norm(mx.zeros((2, 4)), ones, ones, 0.0)


@pytest.mark.parametrize("shape", [(4, 7, 65), (300, 16), (3, 1), (2, 3, 40)])
def test_cross_entropy_and_its_gradient_match_mlx(ext, shape):
    logits = mx.random.normal(shape) * 4
    logits[0, ..., 0] = 60.0  # one confident row: the max-subtraction must hold
    targets = mx.random.randint(0, shape[-1], shape[:-1]).astype(mx.int32)
    ct = mx.random.normal(shape[:-1])
    ref = nn.losses.cross_entropy(logits, targets, reduction="none")
    assert mx.abs(ext.cross_entropy(logits, targets) - ref).max().item() < 2e-5

    def grad(fn):
        return mx.grad(lambda x: (fn(x, targets) * ct).sum())(logits)

    g_ref = grad(lambda x, t: nn.losses.cross_entropy(x, t, reduction="none"))
    assert mx.abs(grad(ext.cross_entropy) - g_ref).max().item() < 2e-6
    compiled = mx.compile(mx.grad(lambda x: (ext.cross_entropy(x, targets) * ct).sum()))
    assert mx.abs(compiled(logits) - g_ref).max().item() < 2e-6


def test_cross_entropy_poisons_bad_rows_instead_of_reading_past_them(ext):
    logits = mx.array([[0.0, 1.0, 2.0], [0.0, float("nan"), 1.0], [0.0, float("inf"), 1.0]])
    loss = ext.cross_entropy(logits, mx.array([2, 0, 0], mx.int32))
    assert math.isfinite(loss[0].item()) and math.isnan(loss[1].item())
    assert not math.isfinite(loss[2].item())
    out_of_range = ext.cross_entropy(logits[:1], mx.array([3], mx.int32))
    assert math.isnan(out_of_range.item())
    g = mx.grad(lambda x: ext.cross_entropy(x, mx.array([-1], mx.int32)).sum())(logits[:1])
    assert mx.allclose(g, mx.softmax(logits[:1], axis=-1)).item()  # no target term


@pytest.mark.parametrize("B, T, S", [(5, 7, 9), (64, 128, 128), (1, 1, 4)])
def test_embed_and_its_gradients_match_mlx_gathers(ext, B, T, S):
    V, C = 11, 20
    wte, wpe = mx.random.normal((V, C)), mx.random.normal((S, C))
    ids = mx.random.randint(0, V, (B, T)).astype(mx.int32)
    ct = mx.random.normal((B, T, C))

    def ref(a, b):
        return a[ids] + b[:T]

    assert mx.array_equal(ext.embed(ids, wte, wpe), ref(wte, wpe)).item()
    grads = mx.grad(lambda a, b: (ext.embed(ids, a, b) * ct).sum(), argnums=(0, 1))(wte, wpe)
    refs = mx.grad(lambda a, b: (ref(a, b) * ct).sum(), argnums=(0, 1))(wte, wpe)
    for g, r, name in zip(grads, refs, ("wte", "wpe"), strict=True):
        assert g.shape == r.shape and mx.abs(g - r).max().item() < 1e-4, name
    if T < S:  # positions past the sequence get no gradient
        assert mx.abs(grads[1][T:]).max().item() == 0


def test_embed_and_cross_entropy_name_bad_inputs(ext):
    wte, wpe = mx.zeros((5, 4)), mx.zeros((8, 4))
    with pytest.raises(ValueError, match=r"ids must be int32 of shape \(B, T\), got float32"):
        ext.embed(mx.zeros((2, 3)), wte, wpe)
    with pytest.raises(ValueError, match="sequence length 9 exceeds the 8 positions"):
        ext.embed(mx.zeros((1, 9), mx.int32), wte, wpe)
    with pytest.raises(ValueError, match=r"wte \(V, C\) and wpe \(S, C\), got \(5,4\) and"):
        ext.embed(mx.zeros((1, 2), mx.int32), wte, mx.zeros((8, 3)))
    with pytest.raises(ValueError, match="targets must be int32, got uint32"):
        ext.cross_entropy(mx.zeros((2, 5)), mx.zeros((2,), mx.uint32))
    with pytest.raises(ValueError, match=r"for targets \(...\), got logits \(2,5\) and"):
        ext.cross_entropy(mx.zeros((2, 5)), mx.zeros((3,), mx.int32))


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_model_trains_the_same_with_and_without_it(ext, dropout):
    """Without dropout, loss and gradients with the primitive equal pure MLX's, at one
    lane and two. With dropout the two paths draw different masks, so there the check
    is that a seed fixes the step and another seed changes it."""
    cfg = GPTConfig(vocab_size=11, block_size=40, n_layer=2, n_head=2, n_emb=16, dropout=dropout)
    mx.random.seed(3)
    model = GPT(cfg)
    idx = mx.array(np.random.default_rng(1).integers(0, 11, (5, 40)), dtype=mx.int32)
    y = mx.array(np.random.default_rng(2).integers(0, 11, (5, 40)), dtype=mx.int32)
    step = nn.value_and_grad(model, lambda m, x, t: ops.loss(m, x, t).mean())  # in lanes

    def run(fused: bool, lanes: int, seed: int = 7):
        with ops.use("native" if fused else "cpu", lanes):
            mx.random.seed(seed)
            loss, grads = step(model, idx, y)
            return loss.item(), dict(tree_flatten(grads))

    if dropout:
        pairs = [(run(True, 2), run(True, 2))]
        assert abs(run(True, 2, seed=8)[0] - pairs[0][0][0]) > 1e-6
    else:
        plain = run(False, 1)
        pairs = [(run(True, 1), plain), (run(True, 2), plain)]
    for (loss_a, grads_a), (loss_b, grads_b) in pairs:
        assert abs(loss_a - loss_b) < 1e-5
        for name, g in grads_a.items():
            assert mx.allclose(g, grads_b[name], atol=1e-5).item(), name


@pytest.mark.parametrize("shape", [(3, 70, 16), (1, 1, 5), (2, 33, 17)])
def test_dropout_draws_the_masks_of_the_pure_mlx_form_and_its_gradient_applies_them(ext, shape):
    mx.random.seed(0)
    x = mx.random.normal(shape)
    for p in (0.1, 0.5):
        mx.random.seed(11)
        want = fastops.dropout(x, p)
        mx.random.seed(11)
        got = ext.dropout(x, fastops.dropout_seed(), p)
        assert mx.allclose(got, want, atol=1e-6).item()
        seed = mx.array([5], dtype=mx.uint32)
        grad = mx.grad(lambda a, seed=seed, p=p: (ext.dropout(a, seed, p) * x).sum())(x)
        kept = ext.dropout(mx.ones(shape), seed, p)
        assert mx.allclose(grad, kept * x, atol=1e-6).item()
        dropped = (kept == 0).astype(mx.float32).mean().item()
        assert abs(dropped - p) < 0.15
    with pytest.raises(ValueError, match="dropout p must be in"):
        ext.dropout(x, mx.array([1], dtype=mx.uint32), 1.0)


@pytest.mark.parametrize(
    "cfg",
    [
        GPTConfig(vocab_size=13, block_size=24, n_layer=2, n_head=2, n_emb=40),
        GPTConfig(
            vocab_size=7, block_size=9, n_layer=1, n_head=3, n_emb=12, bias=False, tie_weights=False
        ),  # fmt: skip
    ],
)
@pytest.mark.parametrize("batch", [1, 3])
def test_decode_step_matches_the_layer_by_layer_cached_path(ext, cfg, batch):
    """The fused step gives the logits and cache of the model's own cached forward pass,
    every step until the cache is full, for batches, without biases and with a separate
    head; the last step fills the cache's last position."""
    mx.random.seed(5)
    model = GPT(cfg)
    model.eval()
    rng = np.random.default_rng(0)
    prompt = mx.array(rng.integers(0, cfg.vocab_size, (batch, 4)), dtype=mx.int32)
    fused, plain = model.make_cache(batch), model.make_cache(batch)
    with ops.use("reference"):
        model(prompt, fused)
        model(prompt, plain)
    for _ in range(cfg.block_size - 4):
        tok = mx.array(rng.integers(0, cfg.vocab_size, (batch,)), dtype=mx.int32)
        with ops.use("native"):
            got = model.decode(tok, fused)
        with ops.use("reference"):
            want = model(tok[:, None], plain)[:, -1]
        assert got.shape == (batch, cfg.vocab_size)
        assert mx.abs(got - want).max().item() < 2e-5
        assert fused[0].offset.item() == plain[0].offset.item()
    for a, b in zip(fused, plain, strict=True):
        assert mx.allclose(a.keys, b.keys, atol=2e-5).item()
        assert mx.allclose(a.values, b.values, atol=2e-5).item()


def test_decode_step_runs_inside_generation_and_leaves_the_inputs_intact(ext):
    """Generation with the fused step samples the same text as the reference backend at
    temperature 0, and a cache passed in is not changed under its holder."""
    cfg = GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_emb=16)
    mx.random.seed(9)
    model = GPT(cfg)
    with ops.use("native"):
        fused = generate(model, np.array([1, 2, 3]), 40, temperature=0.0)
    with ops.use("reference"):
        plain = generate(model, np.array([1, 2, 3]), 40, temperature=0.0)
    assert np.array_equal(fused, plain)
    cache = model.make_cache(1)
    model(mx.array([[1, 2]]), cache)
    before = mx.array(cache[0].keys)
    mx.eval(before)
    held = cache[0].keys
    with ops.use("native"):
        mx.eval(model.decode(mx.array([3], dtype=mx.int32), cache))
    assert mx.array_equal(held, before).item()
    assert not mx.array_equal(cache[0].keys, before).item()


def test_a_cache_the_fused_step_advanced_takes_more_tokens_at_the_right_place(ext):
    """The fused step writes one token into a cache whose filled count this process
    knows (a prefilled one): the count moves with it, so a further chunk of tokens lands
    after that token, as on the reference backend."""
    cfg = GPTConfig(vocab_size=11, block_size=16, n_layer=2, n_head=2, n_emb=16)
    mx.random.seed(9)
    model = GPT(cfg)
    model.eval()
    whole = np.array(model(mx.array([[1, 2, 3, 4, 5]])))[:, 3:]  # no cache
    for backend in ("native", "reference"):
        cache = model.make_cache(1)
        with ops.use(backend):
            model(mx.array([[1, 2]]), cache)
            model.decode(mx.array([3], dtype=mx.int32), cache)
            assert cache[0].filled == 3 and cache[0].offset.item() == 3
            chunk = np.array(model(mx.array([[4, 5]]), cache))
        np.testing.assert_allclose(chunk, whole, atol=1e-5, err_msg=backend)


def test_decode_step_names_bad_inputs(ext):
    cfg = GPTConfig(vocab_size=11, block_size=8, n_layer=1, n_head=2, n_emb=8)
    model = GPT(cfg)
    cache = model.make_cache(1)
    w = model.decode_weights()
    keys, values = [c.keys for c in cache], [c.values for c in cache]
    tok = mx.array([1], dtype=mx.int32)
    with pytest.raises(ValueError, match="tokens must be int32"):
        ext.decode_step(tok.astype(mx.float32), cache[0].offset, w, keys, values, 2, 1e-5)
    with pytest.raises(ValueError, match="5 \\+ 12 per layer"):
        ext.decode_step(tok, cache[0].offset, w[:-1], keys, values, 2, 1e-5)
    with pytest.raises(ValueError, match="every cache must be"):
        ext.decode_step(tok, cache[0].offset, w, [mx.zeros((1, 2, 8, 3))], values, 2, 1e-5)


PROBE = (
    "import warnings, mlx_model, mlx.core as mx; from mlx_model.ops import native; "
    "m = native.load(); print('loaded' if m is not None else 'none')"
)


def probe(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run(
        [sys.executable, "-W", "always", "-c", PROBE],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )


def test_builds_once_into_the_cache_and_rebuilds_a_damaged_one(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    assert probe(env).stdout.strip() == "loaded"
    [lib] = (tmp_path / "shakespeare-gpt").glob("_cpu_kernels-*")
    built = lib.stat().st_mtime_ns
    assert probe(env).stdout.strip() == "loaded"
    assert lib.stat().st_mtime_ns == built  # reused, not rebuilt
    lib.write_bytes(b"\x7fELF damaged")
    run = probe(env)
    assert run.stdout.strip() == "loaded" and "Warning" not in run.stderr
    assert lib.stat().st_size > 10_000


def test_without_a_compiler_it_warns_and_the_model_uses_pure_mlx(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path), "PATH": str(tmp_path)}
    run = probe(env)
    assert run.stdout.strip() == "none"
    assert "no C++ compiler (c++, g++ or clang++)" in run.stderr
    assert "uses pure MLX" in run.stderr
    unwritable = tmp_path / "a-file"
    unwritable.write_text("")
    run = probe({"XDG_CACHE_HOME": str(unwritable)})  # the cache cannot be created
    assert run.stdout.strip() == "none" and "native CPU kernels are not available" in run.stderr
