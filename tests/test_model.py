from __future__ import annotations

import math
import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_model import ops
from mlx_model.config import GPTConfig, SampleConfig, TrainConfig, get_preset
from mlx_model.data import Vocab
from mlx_model.generate import generate, generate_text, stream_text
from mlx_model.model import GPT, loss_fn

CFG = GPTConfig(vocab_size=11, block_size=12, n_layer=2, n_head=2, n_emb=16, dropout=0.0)


def test_forward_shapes_and_dtype():
    mx.random.seed(0)
    model = GPT(CFG)
    idx = mx.array(np.random.default_rng(0).integers(0, 11, (3, 12)), dtype=mx.int32)
    logits = model(idx)
    assert logits.shape == (3, 12, 11)
    assert logits.dtype == mx.float32
    cache = model.make_cache(3)
    assert len(cache) == CFG.n_layer
    assert cache[0].keys.shape == (3, CFG.n_head, 12, CFG.head_dim)


def test_bfloat16_compute_keeps_float32_weights():
    model = GPT(CFG)
    idx = mx.zeros((2, 5), dtype=mx.int32)
    logits = model(idx, dtype=mx.bfloat16)
    assert logits.dtype == mx.float32
    assert model.h[0].attn.c_attn.weight.dtype == mx.float32


def test_attention_dropout_off_leaves_the_attention_weights_whole():
    """attention_dropout=False: in training, attention itself is deterministic (MLX's fused
    kernel) while the residual branches still drop; on, the attention weights drop too."""
    qkv = mx.random.normal((2, 12, 3 * CFG.n_emb), key=mx.random.key(3))

    def attention_twice(attention_dropout: bool) -> list[np.ndarray]:
        attn = GPT(CFG.replace(dropout=0.5, attention_dropout=attention_dropout)).h[0].attn
        outs = []
        for seed in (1, 2):
            mx.random.seed(seed)
            outs.append(np.array(ops.causal_attention(qkv, 2, attn.attention_dropout, True)))
        return outs

    whole, dropped = attention_twice(False), attention_twice(True)
    np.testing.assert_array_equal(whole[0], whole[1])
    assert not np.array_equal(dropped[0], dropped[1])
    model = GPT(CFG.replace(dropout=0.5, attention_dropout=False))
    model.train()
    idx = mx.zeros((2, 12), dtype=mx.int32)
    mx.random.seed(1)
    first = np.array(model(idx))
    mx.random.seed(2)
    assert not np.array_equal(first, np.array(model(idx)))  # the residual dropouts remain


def test_gpt2_initialisation():
    cfg = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_emb=128, dropout=0.0)
    mx.random.seed(1)
    model = GPT(cfg)
    fc = np.array(model.h[0].mlp.c_fc.weight)
    proj = np.array(model.h[0].mlp.c_proj.weight)
    assert fc.std() == pytest.approx(0.02, rel=0.05)
    assert proj.std() == pytest.approx(0.02 / math.sqrt(2 * cfg.n_layer), rel=0.05)
    assert np.all(np.array(model.h[0].attn.c_attn.bias) == 0)
    assert np.all(np.array(model.ln_f.weight) == 1)


def test_initial_loss_is_near_uniform():
    mx.random.seed(0)
    model = GPT(CFG)
    rng = np.random.default_rng(1)
    x, y = (mx.array(rng.integers(0, 11, (4, 12)), dtype=mx.int32) for _ in range(2))
    loss = loss_fn(model, x, y).item()
    assert loss == pytest.approx(math.log(11), abs=0.15)


def test_kv_cache_matches_full_forward_batched():
    mx.random.seed(0)
    model = GPT(CFG)
    model.eval()
    idx = mx.array(np.random.default_rng(2).integers(0, 11, (2, 12)), dtype=mx.int32)
    full = model(idx)
    cache = model.make_cache(2)
    steps = [model(idx[:, :5], cache)]  # a prompt of 5, then one token at a time
    for t in range(5, 12):
        steps.append(model(idx[:, t : t + 1], cache))
    assert cache[0].offset.item() == 12
    assert mx.allclose(mx.concatenate(steps, axis=1), full, atol=1e-5).item()
    # and the cache is not a no-op: without it the single-token logits differ
    alone = model(idx[:, 11:12])
    assert not mx.allclose(alone[:, 0], full[:, 11], atol=1e-3).item()


def test_compiled_decode_step_matches_full_forward_and_ignores_unfilled_slots():
    """The compiled generation step (fixed-size cache state, one token) gives the full
    pass's logits, whatever the buffers hold past the filled positions."""
    from mlx_model.cache import KVCache
    from mlx_model.generate import make_decode_step

    mx.random.seed(0)
    model = GPT(CFG)
    model.eval()
    idx = mx.array(np.random.default_rng(4).integers(0, 11, (3, 12)), dtype=mx.int32)
    full = model(idx)
    greedy = make_decode_step(model, lambda logits, key: (mx.argmax(logits, -1), key))
    for junk in (0.0, 7.0):
        cache = [
            KVCache(mx.full(c.keys.shape, junk), mx.full(c.values.shape, junk), c.offset)
            for c in model.make_cache(3)
        ]
        model(idx[:, :4], cache)
        state, key = [c.state for c in cache], mx.random.key(0)
        for t in range(4, 12):
            tok, state, key = greedy(idx[:, t], state, key)
            assert mx.array_equal(tok, mx.argmax(full[:, t], -1)).item(), (junk, t)


def test_cached_generation_equals_recompute_within_context():
    mx.random.seed(0)
    model = GPT(CFG)
    prompt = np.array([1, 2, 3], dtype=np.int32)
    a = generate(model, prompt, 8, temperature=1.0, seed=3, use_cache=True)
    b = generate(model, prompt, 8, temperature=1.0, seed=3, use_cache=False)
    assert a.shape == (8,)
    np.testing.assert_array_equal(a, b)


def test_generation_past_context_and_batches():
    model = GPT(CFG)
    out = generate(model, np.array([[1, 2], [3, 4]]), 30, temperature=0.0)
    assert out.shape == (2, 30)
    assert out.max() < CFG.vocab_size


def test_same_seed_same_tokens_different_seed_differs():
    model = GPT(CFG)
    a = generate(model, np.array([1]), 40, temperature=1.0, seed=1)
    b = generate(model, np.array([1]), 40, temperature=1.0, seed=1)
    c = generate(model, np.array([1]), 40, temperature=1.0, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_cached_generation_greedy_past_context_follows_its_windows():
    """Two and a half contexts long, batched: past the context the cache re-encodes the
    last half and goes on, so each token is the full forward's argmax over the window
    the cache holds at that point (the whole history while it fits)."""
    mx.random.seed(1)
    model = GPT(CFG)
    model.eval()
    prompt = np.array([[1, 2], [5, 6]], dtype=np.int32)
    block, n = CFG.block_size, 30
    out = generate(model, prompt, n, temperature=0.0)
    assert out.shape == (2, n)
    history, window = prompt, prompt.shape[1]
    for j in range(n):
        if j > 0:
            window = window + 1 if window < block else block // 2 + 1
        logits = model(mx.array(history[:, -window:]))[:, -1]
        np.testing.assert_array_equal(out[:, j], np.array(mx.argmax(logits, -1)), err_msg=str(j))
        history = np.concatenate([history, out[:, j : j + 1]], axis=1)
    assert window < len(history[0]) - 1  # it did go past the context


def _vocab_model():
    vocab = Vocab.from_text("abcdefghij\n")
    mx.random.seed(0)
    return vocab, GPT(CFG.replace(vocab_size=vocab.size))


def test_stop_string_ends_generation_and_is_not_included():
    vocab, model = _vocab_model()
    free = generate_text(model, vocab, SampleConfig(prompt="a", max_tokens=60, seed=2))
    stop = free[5:7]  # a string that does occur in the free-running text
    cut = generate_text(model, vocab, SampleConfig(prompt="a", max_tokens=60, seed=2, stop=stop))
    assert cut == free[: free.index(stop, 1)]
    assert stop not in cut[1:]


def test_streaming_pieces_join_to_the_full_text():
    vocab, model = _vocab_model()
    cfg = SampleConfig(prompt="ab", max_tokens=40, seed=7, stop="zz")  # never occurs
    pieces = list(stream_text(model, vocab, cfg))
    assert len(pieces) == 40  # one piece per token: it streams
    assert "ab" + "".join(pieces) == generate_text(model, vocab, cfg.replace(stop=None))


def test_top_k_one_is_greedy():
    model = GPT(CFG)
    a = generate(model, np.array([1]), 10, temperature=1.0, top_k=1, seed=5)
    g = generate(model, np.array([1]), 10, temperature=0.0)
    np.testing.assert_array_equal(a, g)


def test_sequence_longer_than_context_is_rejected():
    with pytest.raises(ValueError, match="exceeds block_size 12"):
        GPT(CFG)(mx.zeros((1, 13), dtype=mx.int32))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_emb": 10, "n_head": 3}, r"n_emb \(10\) must be divisible by n_head \(3\)"),
        ({"n_layer": 0}, r"n_layer must be a positive integer, got 0"),
        ({"block_size": -4}, r"block_size must be a positive integer, got -4"),
        ({"dropout": 1.5}, r"dropout must be in \[0, 1\), got 1.5"),
    ],
)
def test_bad_model_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPTConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"batch_size": 0}, "batch_size must be a positive integer, got 0"),
        ({"max_iters": -1}, "max_iters must be a positive integer, got -1"),
        ({"learning_rate": 0.0}, "learning_rate must be > 0"),
        ({"compute_dtype": "int8"}, "compute_dtype must be"),
    ],
)
def test_bad_train_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_unknown_preset():
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        get_preset("huge")


def test_config_round_trip():
    assert GPTConfig.from_dict(CFG.to_dict()) == CFG
    with pytest.raises(ValueError, match="unknown GPTConfig fields"):
        GPTConfig.from_dict({**CFG.to_dict(), "n_embd": 3})


def test_attention_dropout_path_matches_fused_path_without_dropout():
    from mlx_model.ops.reference import attention_weights

    q, k, v = (mx.random.normal((2, 2, 6, 4)) for _ in range(3))
    explicit = attention_weights(q, k, 0.5) @ v
    with mx.stream(mx.cpu):
        fused = mx.fast.scaled_dot_product_attention(q, k, v, scale=0.5, mask="causal")
    assert mx.allclose(explicit, fused, atol=1e-5).item()


@pytest.mark.parametrize("batch", [2, 3, 5])
def test_lanes_give_the_same_losses_and_gradients(batch):
    """The batch split over CPU streams (lanes, `ops.loss`, what the training and
    evaluation steps call) computes what the model's own forward computes in one stream."""
    from mlx.utils import tree_flatten

    mx.random.seed(3)
    model = GPT(CFG)
    idx = mx.array(np.random.default_rng(1).integers(0, 11, (batch, 12)), dtype=mx.int32)
    y = mx.array(np.random.default_rng(2).integers(0, 11, (batch, 12)), dtype=mx.int32)
    plain = model.loss(idx, y)
    _, plain_grads = nn.value_and_grad(model, loss_fn)(model, idx, y)
    plain_grads = dict(tree_flatten(plain_grads))
    for lanes in (1, 2, 3):
        with ops.use(lanes=lanes):
            assert ops.backend(mx.float32, True).lanes == lanes
            per_position = ops.loss(model, idx, y)
            _, grads = nn.value_and_grad(model, lambda m, x, t: ops.loss(m, x, t).mean())(
                model, idx, y
            )
        assert per_position.shape == (batch, 12)
        assert mx.allclose(per_position, plain, atol=1e-5).item(), lanes
        for name, g in tree_flatten(grads):
            assert mx.allclose(g, plain_grads[name], atol=1e-5).item(), (lanes, name)


def test_lanes_default_to_usable_cores_and_can_be_set(monkeypatch):
    from mlx_model.runtime.lanes import cpu_lanes

    monkeypatch.delenv("SHAKESPEARE_GPT_CPU_LANES", raising=False)
    assert cpu_lanes() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("SHAKESPEARE_GPT_CPU_LANES", "1")
    with ops.use("cpu"):
        assert ops.backend(mx.float32, True).lanes == 1
    monkeypatch.setenv("SHAKESPEARE_GPT_CPU_LANES", "zero")
    with pytest.raises(ValueError, match="must be a whole number >= 1, got 'zero'"):
        cpu_lanes()


@pytest.mark.parametrize("backend", ["reference", "cpu", "native"])
def test_loss_is_the_cross_entropy_of_the_logits_on_every_backend(backend):
    """The loss as the training step computes it (`ops.loss`: the head and the loss inside
    the lanes) equals MLX's cross-entropy of the model's logits, per position, and its
    gradients equal those of that formulation."""
    from mlx.utils import tree_flatten

    mx.random.seed(4)
    model = GPT(CFG)
    idx = mx.array(np.random.default_rng(5).integers(0, 11, (3, 12)), dtype=mx.int32)
    y = mx.array(np.random.default_rng(6).integers(0, 11, (3, 12)), dtype=mx.int32)

    def plain(m, x, t):
        return nn.losses.cross_entropy(m(x), t, reduction="mean")

    with ops.use(backend, lanes=2):
        per_position = ops.loss(model, idx, y)
        assert per_position.shape == (3, 12)
        ref = nn.losses.cross_entropy(model(idx), y, reduction="none")
        assert mx.allclose(per_position, ref, atol=1e-5).item()
        assert mx.allclose(model.loss(idx, y), ref, atol=1e-5).item()
        _, grads = nn.value_and_grad(model, lambda m, x, t: ops.loss(m, x, t).mean())(model, idx, y)
        _, ref_grads = nn.value_and_grad(model, plain)(model, idx, y)
    ref_grads = dict(tree_flatten(ref_grads))
    for name, g in tree_flatten(grads):
        assert mx.allclose(g, ref_grads[name], atol=1e-5).item(), name


def test_on_the_gpu_backend_evaluation_and_sampling_run_op_by_op(monkeypatch):
    """Where the backend compiles no inference (MLX's CUDA backend: NVRTC's first compile
    of evaluate's and sampling's kernels took 19 s and 24 s on a fresh H200), neither
    calls mx.compile, and both give what the compiled path gives: the same tokens past the
    context (cache re-encoding included) and the same validation loss."""
    import mlx_model.generate as gen
    from mlx_model.evaluate import evaluate

    mx.random.seed(0)
    model = GPT(CFG)
    prompt = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int32)
    ids = np.arange(200, dtype=np.int32) % CFG.vocab_size
    with ops.use("reference"):
        assert ops.compiles_inference()
        compiled = [generate(model, prompt, 30, temperature=t, seed=3) for t in (0.0, 0.9)]
        loss = evaluate(model, ids)["val_loss"]

    def no_compile(*args, **kwargs):
        raise AssertionError("mx.compile called on the op-by-op path")

    monkeypatch.setattr(gen.mx, "compile", no_compile)
    with ops.use("gpu"):
        assert not ops.compiles_inference()
        op_by_op = [generate(model, prompt, 30, temperature=t, seed=3) for t in (0.0, 0.9)]
        assert evaluate(model, ids)["val_loss"] == pytest.approx(loss, rel=1e-6)
    for a, b in zip(compiled, op_by_op, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("backend", ["reference", "gpu"])
def test_cache_writes_at_known_and_array_offsets_agree(backend):
    """The KV cache's three writes (fixed positions where the filled count is known, a
    select for one position at an array offset on the gpu backend, MLX's slice_update
    otherwise) give the same buffers."""
    from mlx_model.cache import KVCache

    rng = np.random.default_rng(0)
    buffer = mx.array(rng.normal(size=(2, 3, 8, 4)).astype(np.float32))
    other = buffer + 100.0  # the values' buffer
    for start, length in ((0, 5), (5, 1), (7, 1), (2, 3)):
        new_k, new_v = (
            mx.array(rng.normal(size=(2, 3, length, 4)).astype(np.float32)) for _ in range(2)
        )
        want_k, want_v = np.array(buffer), np.array(other)
        want_k[:, :, start : start + length] = np.array(new_k)
        want_v[:, :, start : start + length] = np.array(new_v)
        offset = mx.array([start], mx.int32)
        with ops.use(backend):
            known = KVCache(buffer, other, offset, filled=start)
            rebuilt = KVCache(buffer, other, offset)  # as a compiled step rebuilds it
            for cache in (known, rebuilt):
                keys, values = cache.update_and_fetch(new_k, new_v)
                np.testing.assert_array_equal(np.array(keys), want_k)
                np.testing.assert_array_equal(np.array(values), want_v)
                assert cache.offset.item() == start + length
        assert known.filled == start + length and rebuilt.filled is None


def test_the_gpu_backends_cached_embedding_is_the_lookup():
    """Continuing a cache, the gpu backend's one-hot products pick the rows a lookup
    picks (float32 on the CPU: exactly)."""
    mx.random.seed(1)
    wte, wpe = mx.random.normal((11, 16)), mx.random.normal((12, 16))
    ids, pos = mx.array([[3, 7, 1]]), mx.array([4, 5, 6], mx.int32)
    with ops.use("reference"):
        looked_up = ops.embed(ids, wte, wpe, False, positions=pos)
    with ops.use("gpu"):
        picked = ops.embed(ids, wte, wpe, False, positions=pos)
    np.testing.assert_array_equal(np.array(picked), np.array(looked_up))
    np.testing.assert_array_equal(np.array(looked_up), np.array(wte[ids] + wpe[pos]))


@pytest.mark.parametrize("backend", ["gpu", "auto"])
def test_cached_generation_on_each_backend_is_the_references(backend):
    """Within the context, cached equals recomputed; past it (the cache re-encodes its
    last half), the same tokens as the reference backend's cached generation."""
    mx.random.seed(0)
    model = GPT(CFG)
    prompt = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.int32)
    with ops.use("reference"):
        past = generate(model, prompt, 30, temperature=1.0, seed=3)
    with ops.use(backend):
        a = generate(model, prompt, 9, temperature=1.0, seed=3, use_cache=True)
        b = generate(model, prompt, 9, temperature=1.0, seed=3, use_cache=False)
        np.testing.assert_array_equal(generate(model, prompt, 30, temperature=1.0, seed=3), past)
    np.testing.assert_array_equal(a, b)


def test_a_long_context_keeps_the_one_hot_lookup_in_training(monkeypatch):
    """The position table's size matters only where positions are looked up (a cached
    forward): a context over 1024 still trains without the gather (and its scatter)."""
    from mlx_model.ops.reference import Reference

    def gather(*args, **kwargs):
        raise AssertionError("fell back to the gather")

    wte, wpe, ids = mx.zeros((65, 8)), mx.zeros((2048, 8)), mx.zeros((1, 4), mx.int32)
    monkeypatch.setattr(Reference, "embed", gather)
    with ops.use("gpu"):
        assert ops.embed(ids, wte, wpe, True).shape == (1, 4, 8)
        with pytest.raises(AssertionError, match="fell back"):
            ops.embed(ids, wte, wpe, False, positions=mx.arange(4, dtype=mx.int32))
