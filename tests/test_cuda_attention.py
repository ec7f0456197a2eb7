"""cuDNN's fused attention with dropout (`mlx_model.ops.cuda`): on an NVIDIA GPU only.

Skipped where MLX does not run on CUDA (CI's machines); run on a GPU machine with
`python -m pytest tests/test_cuda_attention.py`, or `python tests/test_cuda_attention.py`
where Prefect (which the suite's conftest imports) is not installed (test names as
arguments run those alone). Checks the dropout's share, scale and seeding; that the
backward drops the weights the forward dropped (read out of v's gradient); and the output
and gradients against the same function written in MLX with the kernel's own mask, which
value matrices of identity rows read out, D columns at a time.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: import the checkout's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import mlx_model  # noqa: E402, F401, I001  (before MLX: the kernel cache and the BLAS)
import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# the read-outs of the kernel's dropped weights, shared with the per-shape check
from cudnn_attention_check import backward_weights, forward_weights  # noqa: E402

from mlx_model import ops  # noqa: E402
from mlx_model.ops import cuda  # noqa: E402
from mlx_model.ops.reference import attention_weights, merge_heads, split_heads  # noqa: E402

pytestmark = pytest.mark.skipif(not cuda.usable(), reason="needs MLX on an NVIDIA GPU")

B, T, H, D = 2, 128, 3, 64  # T: cuDNN's backward runs correctly at multiples of 128
SCALE = 1.0 / math.sqrt(D)
C = H * D


@pytest.fixture(scope="module")
def ext():
    module = cuda.load()
    assert module is not None, "cuDNN attention did not build here"
    return module


def _qkv(seed: int) -> mx.array:
    return mx.random.normal((B, T, 3 * C), key=mx.random.key(seed)).astype(mx.bfloat16)


def _seed(value: int) -> mx.array:
    return mx.array([value, 7], dtype=mx.int64)


def _reference(qkv: mx.array, keep: mx.array | None, p: float) -> mx.array:
    """The same attention in MLX, in float32, with a given keep mask (B, H, T, T)."""
    q, k, v = split_heads(qkv.astype(mx.float32), H)
    w = attention_weights(q, k, SCALE)
    if keep is not None:
        w = mx.where(keep, w / (1 - p), 0.0)
    return merge_heads(w @ v)


def _close(a: mx.array, b: mx.array, tol: float) -> float:
    err = mx.abs(a.astype(mx.float32) - b.astype(mx.float32)).max().item()
    scale = max(1.0, mx.abs(b.astype(mx.float32)).max().item())
    assert err <= tol * scale, (err, scale)
    return err


def test_dropout_drops_the_share_p_scales_the_rest_and_follows_the_seed(ext):
    p, qkv = 0.2, _qkv(2)
    dropped = forward_weights(ext, qkv, _seed(11), H, p)
    full = attention_weights(*split_heads(qkv.astype(mx.float32), H)[:2], SCALE)
    causal = np.tril(np.ones((T, T), bool))[None, None]
    kept = np.array(dropped) != 0
    share = 1 - kept[np.broadcast_to(causal, kept.shape)].mean()
    assert abs(share - p) < 0.02, share
    scaled = np.array(full)[kept] / (1 - p)
    assert np.allclose(np.array(dropped)[kept], scaled, rtol=2e-2, atol=1e-3)
    assert not kept[~np.broadcast_to(causal, kept.shape)].any()  # the future stays masked
    again = forward_weights(ext, qkv, _seed(11), H, p)
    other = forward_weights(ext, qkv, _seed(12), H, p)
    assert mx.array_equal(dropped, again).item()
    assert not mx.array_equal(dropped, other).item()


def test_the_backward_drops_the_weights_the_forward_dropped(ext):
    p, qkv, seed = 0.2, _qkv(3), _seed(5)
    forward = forward_weights(ext, qkv, seed, H, p)
    backward = backward_weights(ext, qkv, seed, H, p)
    assert mx.array_equal(forward != 0, backward != 0).item()
    _close(backward, forward, 2e-2)


def test_with_dropout_the_output_and_gradients_are_the_function_of_its_mask(ext):
    """The mask does not depend on the values: read it out with identity values, then
    compare the kernel on real values (forward and backward) with MLX on that mask."""
    p, qkv, seed = 0.2, _qkv(4), _seed(21)
    keep = forward_weights(ext, qkv, seed, H, p) != 0
    ct = mx.random.normal((B, T, C), key=mx.random.key(5))

    def fused(x):
        return (ext.causal_attention(x, seed, H, SCALE, p).astype(mx.float32) * ct).sum()

    def mlx(x):
        return (_reference(x, keep, p) * ct).sum()

    _close(ext.causal_attention(qkv, seed, H, SCALE, p), _reference(qkv, keep, p), 2e-2)
    fused_grad, mlx_grad = mx.grad(fused)(qkv), mx.grad(mlx)(qkv)
    for part in range(3):  # q, k and v each
        sl = slice(part * C, (part + 1) * C)
        _close(fused_grad[..., sl], mlx_grad[..., sl], 3e-2)


def test_its_gradient_flows_to_qkv_alone(ext):
    """The output buffers are made from qkv, but no gradient goes back through them (which
    cost a sum and a full-size update of qkv's gradient per layer)."""
    import tempfile
    from pathlib import Path

    grad = mx.grad(lambda x: ext.causal_attention(x, _seed(1), H, SCALE, 0.2).sum())(_qkv(6))
    with tempfile.TemporaryDirectory() as tmp:
        mx.export_to_dot(str(Path(tmp) / "g.dot"), grad)
        graph = (Path(tmp) / "g.dot").read_text()
    assert "CudnnCausalAttentionGrad" in graph
    assert "SliceUpdate" not in graph and "Sum" not in graph


def test_the_gpu_backend_trains_with_it_compiled_and_not(ext):
    """The run's own step (`make_step`, the joined optimizer) with cuDNN attention, op by
    op and compiled, from the same weights and dropout seeds: the same losses over three
    steps within bfloat16 rounding."""
    from mlx_model.config import GPTConfig, TrainConfig
    from mlx_model.model import GPT
    from mlx_model.train import make_optimizer, make_step

    cfg = GPTConfig(vocab_size=65, block_size=T, n_layer=2, n_head=H, n_emb=H * D, dropout=0.2)
    tc = TrainConfig(compute_dtype="bfloat16")
    rng = np.random.default_rng(0)
    x, y = (mx.array(rng.integers(0, 65, (4, T)), dtype=mx.int32) for _ in range(2))
    losses = {}
    with ops.use("gpu"):
        assert ops.signature("bfloat16", model=cfg)["attention"] == "cudnn"
        for compiled in (False, True):
            mx.random.seed(0)
            model, optimizer = GPT(cfg), make_optimizer(tc)
            optimizer.init(model.trainable_parameters())
            model.train()
            step = make_step(model, optimizer, tc, mx.bfloat16, compiled=compiled)
            before = np.array(model.h[0].attn.c_attn.weight)
            mx.random.seed(9)  # the same dropout seeds both ways
            losses[compiled] = [step(x, y).item() for _ in range(3)]
            assert not np.array_equal(np.array(model.h[0].attn.c_attn.weight), before)
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-2)


def test_bad_input_is_named(ext):
    qkv = _qkv(0)
    with pytest.raises(ValueError, match="qkv must be bfloat16 or float16, got float32"):
        ext.causal_attention(qkv.astype(mx.float32), _seed(1), H, SCALE, 0.1)
    for p in (0.0, 1.0):
        with pytest.raises(ValueError, match=f"dropout p must be in \\(0, 1\\).* got {p:g}"):
            ext.causal_attention(qkv, _seed(1), H, SCALE, p)
    with pytest.raises(ValueError, match="head_dim must be a multiple of 8 up to 128, got 36"):
        ext.causal_attention(qkv[..., : 3 * 3 * 36], _seed(1), 3, SCALE, 0.1)
    with pytest.raises(ValueError, match="batch must be >= 1, got 0"):
        ext.causal_attention(mx.zeros((0, T, 3 * C), mx.bfloat16), _seed(1), H, SCALE, 0.1)
    for t in (64, 192):  # where cuDNN 9.14's backward read out of bounds
        with pytest.raises(ValueError, match=f"sequence length must be a multiple of 128, got {t}"):
            ext.causal_attention(mx.zeros((B, t, 3 * C), mx.bfloat16), _seed(1), H, SCALE, 0.1)


if __name__ == "__main__":  # without pytest's conftest (which needs Prefect): each test once
    if not cuda.usable():
        print("skipped: needs MLX on an NVIDIA GPU")
        raise SystemExit(0)
    module = cuda.load()
    if module is None:
        raise SystemExit("cuDNN attention did not build here (see the warning above)")
    chosen = sys.argv[1:]  # test names, to run some alone (default: all)
    for name, fn in list(globals().items()):
        if name.startswith("test_") and (not chosen or name in chosen):
            fn(module)
            print("passed", name)
