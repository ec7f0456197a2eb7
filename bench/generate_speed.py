"""Generation tokens/s with the KV cache against full recomputation, same model, same process.

python bench/generate_speed.py --preset nanogpt-char --tokens 1000

The prompt fills the context, so recomputation runs `block_size` tokens through the
model for every new token, and the cache re-encodes half a context every block/2 tokens.
"""

# ruff: noqa: I001
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx_model  # noqa: E402,F401,I001  (must come before mlx.core: it preloads OpenBLAS)

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from mlx_model.config import get_preset  # noqa: E402
from mlx_model.generate import generate  # noqa: E402
from mlx_model.model import GPT  # noqa: E402


def rate(model, prompt, n, use_cache):
    """Tokens/s for n tokens after a full-context prompt (so every step sees `block` tokens)."""
    generate(model, prompt, 20, temperature=1.0, use_cache=use_cache)  # warm-up, compiles
    t = time.perf_counter()
    generate(model, prompt, n, temperature=1.0, seed=1, use_cache=use_cache)
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="nanogpt-char")
    p.add_argument("--tokens", type=int, default=1000)
    args = p.parse_args()
    model = GPT(get_preset(args.preset).model)
    mx.eval(model.parameters())
    block = model.config.block_size
    prompt = np.random.default_rng(0).integers(0, model.config.vocab_size, block)
    cached = rate(model, prompt, args.tokens, True)
    full = rate(model, prompt, args.tokens, False)
    print(
        json.dumps(
            {
                "preset": args.preset,
                "device": str(mx.default_device()),
                "tokens": args.tokens,
                "context": block,
                "kv_cache_tok_s": round(cached, 1),
                "recompute_tok_s": round(full, 1),
                "speedup": round(cached / full, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
