"""Generation tokens/s with the KV cache against full recomputation, same model, same process.

python bench/generate_speed.py --preset nanogpt-char --tokens 1000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

import mlx_model  # noqa: E402,F401
from mlx_model.config import get_preset  # noqa: E402
from mlx_model.generate import generate  # noqa: E402
from mlx_model.model import GPT  # noqa: E402


def rate(model, n, use_cache):
    generate(model, np.array([0]), 20, temperature=1.0, use_cache=use_cache)  # warm-up
    t = time.perf_counter()
    generate(model, np.array([0]), n, temperature=1.0, seed=1, use_cache=use_cache)
    return n / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="nanogpt-char")
    p.add_argument("--tokens", type=int, default=1000)
    args = p.parse_args()
    model = GPT(get_preset(args.preset).model)
    mx.eval(model.parameters())
    cached, full = rate(model, args.tokens, True), rate(model, args.tokens, False)
    print(
        json.dumps(
            {
                "preset": args.preset,
                "device": str(mx.default_device()),
                "tokens": args.tokens,
                "kv_cache_tok_s": round(cached, 1),
                "recompute_tok_s": round(full, 1),
                "speedup": round(cached / full, 2),
            }
        )
    )


if __name__ == "__main__":
    main()
