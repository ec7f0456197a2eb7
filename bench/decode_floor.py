# ruff: noqa: I001
"""How much of a cached generation step is the device and how much the host read-back.

python bench/decode_floor.py --preset nanogpt-char --tokens 1000

Chains the compiled one-token step `tokens` times with nothing read back until the end
(the device-bound floor), then the same with one read-back per token (what streaming does).
"""

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
from mlx_model.generate import make_decode_step, make_sampler  # noqa: E402
from mlx_model.model import GPT  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--preset", default="nanogpt-char")
    p.add_argument("--tokens", type=int, default=1000)
    args = p.parse_args()
    model = GPT(get_preset(args.preset).model)
    model.eval()
    mx.eval(model.parameters())
    step = make_decode_step(model, make_sampler(1.0, None, None))

    block = model.config.block_size

    def chain(read_each: bool) -> float:
        tok, key = mx.zeros((1,), dtype=mx.int32), mx.random.key(0)
        t = time.perf_counter()
        for i in range(args.tokens):
            if i % (block - 1) == 0:  # a fresh cache before this one fills
                cache = model.make_cache(1)
                model(mx.zeros((1, 1), dtype=mx.int32), cache)
                state = [c.state for c in cache]
            tok, state, key = step(tok, state, key)
            mx.async_eval(tok, key)
            if read_each:
                np.array(tok)
        mx.eval(tok)
        return args.tokens / (time.perf_counter() - t)

    chain(False)
    floor, streamed = chain(False), chain(True)
    print(
        json.dumps(
            {
                "preset": args.preset,
                "device": str(mx.default_device()),
                "no_readback_tok_s": round(floor, 1),
                "readback_each_tok_s": round(streamed, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
