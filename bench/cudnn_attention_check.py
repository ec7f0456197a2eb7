"""GPU: for which shapes cuDNN attention's backward is the gradient of its forward.

    python bench/cudnn_attention_check.py [--shapes 2x64x3 2x128x3 ...] [--p 0.2]

Each shape B x T x H (head_dim 64, bfloat16, dropout p) runs in a process of its own: a
kernel that reads out of bounds ends its process with an illegal memory access, and the
next shape must not inherit a broken CUDA context. The extension's own sequence check is
lifted in the child (`SHAKESPEARE_GPT_CUDNN_ANY_T=1`), so that shapes it refuses can be
tried. Per shape it prints one JSON line:

- `mask_agree`: the share of causal weights (the rest are always 0) that the forward and
  the backward both keep or both drop. The forward's dropped and scaled weights are read
  out of its output with values that are identity rows (64 key columns at a time); the
  backward's out of v's gradient with a cotangent that is identity rows (v's gradient is
  the weights' transpose times the cotangent).
- `weights_err`: the largest difference between those two weight matrices.
- `dq_err`, `dk_err`, `dv_err`: the largest difference of each gradient from MLX's
  attention on the forward's mask, over the largest gradient value.
- `kept`: the share of causal weights kept (1 - p expected).
- `cudnn`: the cuDNN version loaded; `error`: the child's last line where it failed.

Where MLX has no CUDA, each shape reports that it needs an NVIDIA GPU. The figures of
`docs/runs/cudnn-verify-h200-20261201.log` come from this check.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mlx_model  # noqa: E402, F401, I001  (before MLX: the kernel cache and the BLAS)
import mlx.core as mx  # noqa: E402

D = 64
SHAPES = ["2x64x3", "2x128x3", "2x128x6", "2x192x6", "2x256x3", "2x320x6", "2x512x6"]
SHAPES += ["8x256x12", "64x256x6"]


def parse_shape(text: str) -> tuple[int, int, int]:
    """'BxTxH' -> (B, T, H); ValueError names a bad one (T must be a multiple of 64)."""
    try:
        b, t, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a shape is BxTxH, got {text!r}") from None
    if min(b, t, h) < 1 or t % D:
        raise ValueError(f"B, T, H must be >= 1 and T a multiple of {D}, got {text!r}")
    return b, t, h


def _heads(x: mx.array, heads: int) -> mx.array:
    """(B, T, C) -> (B, H, T, head_dim), in float32."""
    b, t, c = x.shape
    return x.astype(mx.float32).reshape(b, t, heads, c // heads).transpose(0, 2, 1, 3)


def _identity_block(shape: tuple[int, ...], heads: int, j: int, dtype: mx.Dtype) -> mx.array:
    """(B, T, C): in every head, row t is the unit vector e_(t - d j) for t in block j of
    d = head_dim rows, else zeros. As values it reads columns d j.. of the weights out of
    the output; as the output's cotangent, rows d j.. of the weights out of v's gradient."""
    b, t, c = shape
    d = c // heads
    e = (mx.arange(t)[:, None] == mx.arange(d)[None, :] + d * j).astype(dtype)  # (T, d)
    return mx.broadcast_to(e[None, :, None, :], (b, t, heads, d)).reshape(b, t, c)


def forward_weights(ext, qkv: mx.array, seed: mx.array, heads: int, p: float) -> mx.array:
    """The forward kernel's dropped and scaled weights (B, H, T, T) for qkv's q and k
    (qkv (B, T, 3C), T a multiple of head_dim)."""
    c = qkv.shape[-1] // 3
    scale, blocks = 1 / math.sqrt(c // heads), []
    for j in range(qkv.shape[1] // (c // heads)):
        v = _identity_block((*qkv.shape[:2], c), heads, j, qkv.dtype)
        x = mx.concatenate([qkv[..., : 2 * c], v], axis=-1)
        blocks.append(_heads(ext.causal_attention(x, seed, heads, scale, p), heads))
    return mx.concatenate(blocks, axis=-1)


def backward_weights(ext, qkv: mx.array, seed: mx.array, heads: int, p: float) -> mx.array:
    """The backward kernel's dropped and scaled weights (B, H, T, T): v's gradient is the
    weights' transpose times the cotangent."""
    c = qkv.shape[-1] // 3
    scale, rows = 1 / math.sqrt(c // heads), []
    for j in range(qkv.shape[1] // (c // heads)):
        ct = _identity_block((*qkv.shape[:2], c), heads, j, mx.float32)

        def loss(x, ct=ct):
            return (ext.causal_attention(x, seed, heads, scale, p).astype(mx.float32) * ct).sum()

        rows.append(_heads(mx.grad(loss)(qkv)[..., 2 * c :], heads).transpose(0, 1, 3, 2))
    return mx.concatenate(rows, axis=2)


def check(b: int, t: int, h: int, p: float) -> dict:
    """The child: the figures above for one shape."""
    from mlx_model.ops import cuda
    from mlx_model.ops.reference import attention_weights, merge_heads, split_heads

    ext = cuda.load()
    if ext is None:
        return {"error": "needs MLX on an NVIDIA GPU with cuDNN attention built"}
    c, scale = h * D, 1 / math.sqrt(D)
    seed = mx.array([5, 9], dtype=mx.int64)
    qkv = mx.random.normal((b, t, 3 * c), key=mx.random.key(1)).astype(mx.bfloat16)
    w_f = forward_weights(ext, qkv, seed, h, p)
    w_b = backward_weights(ext, qkv, seed, h, p)
    keep = w_f != 0
    ct = mx.random.normal((b, t, c), key=mx.random.key(3))

    def reference(x):
        q, k, v = split_heads(x.astype(mx.float32), h)
        w = mx.where(keep, attention_weights(q, k, scale) / (1 - p), 0.0)
        return (merge_heads(w @ v) * ct).sum()

    def fused(x):
        return (ext.causal_attention(x, seed, h, scale, p).astype(mx.float32) * ct).sum()

    fused_grad = mx.grad(fused)(qkv).astype(mx.float32)
    ref = mx.grad(reference)(qkv)
    causal = mx.tril(mx.ones((t, t), dtype=mx.bool_))  # above it both are always 0
    agree = mx.logical_and(keep == (w_b != 0), causal)
    out = {
        "mask_agree": mx.sum(agree).item() / (b * h * t * (t + 1) / 2),
        "weights_err": mx.max(mx.abs(w_f - w_b)).item(),
        "kept": mx.sum(keep).item() / (b * h * t * (t + 1) / 2),
    }
    for i, name in enumerate(("dq_err", "dk_err", "dv_err")):
        a, r = fused_grad[..., i * c : (i + 1) * c], ref[..., i * c : (i + 1) * c]
        out[name] = round(mx.max(mx.abs(a - r)).item() / max(1e-6, mx.max(mx.abs(r)).item()), 4)
    import ctypes

    try:
        out["cudnn"] = ctypes.CDLL("libcudnn.so.9").cudnnGetVersion()
    except OSError:
        out["cudnn"] = None
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.partition("\n\n")[0],
        epilog=__doc__.partition("\n\n")[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--shapes", nargs="+", default=SHAPES, help="BxTxH, T a multiple of 64")
    p.add_argument("--p", type=float, default=0.2, help="dropout probability, in (0, 1)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds per shape")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not 0 < args.p < 1:
        p.error(f"--p must be in (0, 1), got {args.p}")
    try:
        shapes = [parse_shape(s) for s in args.shapes]
    except ValueError as err:
        p.error(str(err))
    if args.child:
        print(json.dumps(check(*parse_shape(args.child), args.p)), flush=True)
        return 0
    env = dict(os.environ, SHAKESPEARE_GPT_CUDNN_ANY_T="1")
    for shape, text in zip(shapes, args.shapes, strict=True):
        cmd = [sys.executable, __file__, "--child", text, "--p", str(args.p)]
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
            lines = run.stdout.strip().splitlines()
            try:
                result = json.loads(lines[-1]) if run.returncode == 0 and lines else None
            except ValueError:
                result = None
            if result is None:
                tail = (run.stderr.strip().splitlines() or [f"exit code {run.returncode}"])[-1]
                result = {"error": tail}
        except subprocess.TimeoutExpired:
            result = {"error": f"no answer within {args.timeout:g} s"}
        print(json.dumps({"shape": list(shape), **result}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
