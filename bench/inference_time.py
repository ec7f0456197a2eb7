"""Seconds to evaluate a preset's model on the validation split and to sample from it,
compiled and op by op, in the order given: on an empty kernel cache the first of each
pays for compiling.

    python bench/inference_time.py --corpus input.txt [--preset nanogpt-char]
        [--order eval-op,eval-op,sample-op,sample-op,eval-c,eval-c,sample-c,sample-c]

One process, the preset's model with fresh weights (the time does not depend on them):
`mlx_model.evaluate.evaluate` on the last tenth of the corpus and
`mlx_model.generate.generate` of `--tokens` tokens at temperature 0.8, each compiled
("-c") or op by op ("-op") with the device's ops backend. Prints a JSON line per item:
seconds, and the modules in MLX's kernel cache after it (on a GPU).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gpu_race import doc_parser  # noqa: E402

ITEMS = ("eval-op", "eval-c", "sample-op", "sample-c")


def main(argv: list[str] | None = None) -> list[dict]:
    p = doc_parser(__doc__)
    p.add_argument("--corpus", required=True, help="Tiny Shakespeare's input.txt")
    p.add_argument("--preset", default="nanogpt-char", help="the model's preset")
    p.add_argument("--tokens", type=int, default=500, help="tokens per sample (default 500)")
    p.add_argument("--order", default=",".join(ITEMS), help=f"items from {list(ITEMS)}")
    args = p.parse_args(argv)
    order = args.order.split(",")
    bad = [item for item in order if item not in ITEMS]
    if bad:
        p.error(f"--order has {bad[0]!r}; choose from {list(ITEMS)}")
    if not Path(args.corpus).is_file():
        p.error(f"--corpus: no such file: {args.corpus}")
    if args.tokens < 1:
        p.error(f"--tokens must be >= 1, got {args.tokens}")

    import mlx_model  # noqa: F401, I001  (before MLX: the kernel cache and the BLAS)
    import mlx.core as mx
    import numpy as np

    from mlx_model.config import get_preset
    from mlx_model.evaluate import evaluate
    from mlx_model.generate import generate
    from mlx_model.model import GPT
    from mlx_model.runtime import kernel_cache
    from train_preset import corpus_splits

    try:
        preset = get_preset(args.preset)
    except ValueError as err:
        p.error(str(err))
    vocab, _, val = corpus_splits(args.corpus)
    mx.random.seed(0)
    model = GPT(preset.model.replace(vocab_size=vocab.size))
    mx.eval(model.parameters())
    cache = kernel_cache.active()
    reports = []
    for item in order:
        kind, mode = item.split("-")
        start = time.perf_counter()
        compiled = mode == "c"
        if kind == "eval":
            evaluate(model, val, compiled=compiled)
        else:
            prompt = np.array([0], np.int32)
            generate(model, prompt, args.tokens, temperature=0.8, seed=1, compiled=compiled)
        report = {
            "item": item,
            "compiled": compiled,
            "seconds": round(time.perf_counter() - start, 3),
            "modules": kernel_cache.count_modules(cache.private) if cache else None,
        }
        print(json.dumps(report), flush=True)
        reports.append(report)
    return reports


if __name__ == "__main__":
    main()
