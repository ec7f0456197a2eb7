"""Where a run's first seconds go: `bench/train_preset.py`, timed from process start.

    python bench/start_timeline.py --corpus input.txt --preset nanogpt-char-fast
        [--stop-after 100] [any other train_preset.py option]

Runs `bench/train_preset.py` with its arguments in this process and prints to stderr, each
line with the seconds since the process started (the kernel's start time in /proc, so the
interpreter's own start counts): the imports, reading the corpus, the process group
(`mlx_model.distributed.process_group`), the model's build (`_fresh`), the cuDNN attention
library's load and check (`ops.cuda._import`, `checked_once`), the step functions' setup,
and the first 12 training steps, each as the call (on the first, MLX's trace of the
compiled step) and the wait for its loss (`mx.eval`); then each estimate and each weight
snapshot. Waiting for every early step's loss holds the queue back, so the steps after
the first run a little slower than in a plain run; the estimates and everything before
the loop are as in one. Linux only (it reads /proc).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def _since_process_start() -> float:
    """Seconds since the kernel started this process (/proc/self/stat's starttime)."""
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    started = int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return float(Path("/proc/uptime").read_text().split()[0]) - started


BASE = time.perf_counter() - _since_process_start()


def mark(what: str) -> None:
    print(f"[{time.perf_counter() - BASE:7.3f}] {what}", file=sys.stderr, flush=True)


def timed(owner, name: str, label: str | None = None) -> None:
    """Replace `owner.name` with a wrapper that marks each call's duration."""
    fn, calls = getattr(owner, name), [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        t = time.perf_counter()
        out = fn(*args, **kwargs)
        mark(f"{label or name} #{calls[0]}: {time.perf_counter() - t:.3f} s")
        return out

    setattr(owner, name, wrapper)


def main() -> None:
    mark("interpreter up")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages
    import mlx_model  # noqa: F401  (before MLX: the BLAS it binds)

    mark("mlx_model (and mlx.core) imported")
    import mlx.core as mx
    import numpy  # noqa: F401

    mark("numpy imported")
    import mlx_model.train as train
    from mlx_model.ops import cuda

    mark("mlx_model.train imported")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import train_preset

    timed(train_preset, "corpus_splits")
    timed(train, "process_group")
    timed(mx.distributed, "init", "mx.distributed.init")
    timed(train, "_fresh", "model and optimizer built (_fresh)")
    timed(cuda, "_import", "cuDNN attention loaded (_import)")
    timed(cuda, "checked_once", "its check, or its record of one (checked_once)")
    timed(train.StepFunctions, "__init__", "step functions set up (StepFunctions.__init__)")
    timed(train, "estimate_loss")
    timed(train, "snapshot", "weights copied to the host (snapshot)")
    at = train.StepFunctions.at

    def at_timed(self, step):
        step_fn, loss_sum = at(self, step)
        if step >= 12:
            return step_fn, loss_sum

        def run(x, y):
            t = time.perf_counter()
            loss = step_fn(x, y)
            called = time.perf_counter()
            mx.eval(loss)
            mark(f"step {step}: call {called - t:.3f} s, loss {time.perf_counter() - called:.3f} s")
            return loss

        return run, loss_sum

    train.StepFunctions.at = at_timed
    sys.argv = [str(Path(__file__).with_name("train_preset.py")), *sys.argv[1:]]
    train_preset.main()
    mark("end")


if __name__ == "__main__":
    main()
