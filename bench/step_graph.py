"""The operations in one training step's graph, with the parameters joined from the model
each step or kept flat in the optimizer (`FlatOptimizer.master`), on any device.

    python bench/step_graph.py [--preset nanogpt-char] [--ops gpu]

Builds the preset's model (its width and depth; context 16, batch 2: the node counts do not
depend on them), the joined optimizer and the uncompiled bfloat16 step of each form, runs
one step and counts, in MLX's graph export of its outputs, the nodes, the casts (AsType) and
the arrays fed into joins (Concatenate): on a GPU each cast and each joined array is a
kernel launch. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx_model  # noqa: E402, F401  (before MLX: the BLAS it binds)


def count(preset: str, backend: str) -> dict:
    """The counts of `graph_counts` for `preset`'s model (context 16, batch 2)."""
    from mlx_model.config import PRESETS

    cfg = PRESETS[preset].model.replace(vocab_size=65, block_size=16)
    return graph_counts(cfg, PRESETS[preset].train.replace(batch_size=2), backend)


def graph_counts(cfg, tc, backend: str) -> dict[str, dict[str, int]]:
    """For one bfloat16 step of `cfg`'s model on `tc`'s batch ("joined": the parameters
    joined from the model each step; "master": kept flat), the graph's nodes, casts and
    arrays joined."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from mlx_model import ops
    from mlx_model.model import GPT
    from mlx_model.train import make_optimizer, make_step

    tc = tc.replace(compute_dtype="bfloat16")
    x = mx.zeros((tc.batch_size, cfg.block_size), dtype=mx.int32)
    report = {}
    for form in ("joined", "master"):
        with ops.use(backend):
            mx.random.seed(0)
            model = GPT(cfg)
            model.train()
            opt = make_optimizer(tc, joined=True)
            opt.init(model.trainable_parameters())
            mx.eval(model.parameters(), opt.state)
            if form == "joined":
                opt.for_compute = None  # the parameters joined from the model each step
            step = make_step(model, opt, tc, mx.bfloat16, compiled=False)
            mx.eval(opt.master)
            loss = step(x, x)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "step.dot"
                outputs = [v for _, v in tree_flatten((model.parameters(), opt.state))]
                mx.export_to_dot(str(path), loss, *outputs)
                graph = path.read_text()
        labels = Counter(re.findall(r'label ="([A-Za-z]+)', graph))
        joins = set(re.findall(r'\{ (\w+) \[label ="Concatenate"', graph))
        joined = sum(target in joins for target in re.findall(r"-> (\w+)", graph))
        report[form] = {"nodes": sum(labels.values()), "casts": labels["AsType"],
                        "arrays joined": joined}  # fmt: skip
    return report


def main(argv: list[str] | None = None) -> dict:
    from mlx_model.config import PRESETS
    from mlx_model.ops import CHOICES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="nanogpt-char", choices=sorted(PRESETS))
    p.add_argument("--ops", default="gpu", choices=CHOICES, help="the ops backend")
    args = p.parse_args(argv)
    report = {"preset": args.preset, "ops": args.ops, **count(args.preset, args.ops)}
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
