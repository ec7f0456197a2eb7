"""Where a run's first seconds go, timed from process start: the training alone
(`bench/train_preset.py`) or `shakespeare-gpt run` itself (`--cli`).

    python bench/start_timeline.py --corpus input.txt --preset nanogpt-char-fast
        [--stop-after 100] [any other train_preset.py option]
    python bench/start_timeline.py --cli [--no-warm-ahead] run --preset nanogpt-char-fast
        --source file:///path/to/input.txt --artifacts FRESH_FOLDER [any other option]

Runs `bench/train_preset.py`, or with `--cli` the CLI (`flows.entry.main`, the
`shakespeare-gpt` command) with the arguments after it, in this process, and prints to
stderr, each line with the seconds since the process started (the kernel's start time in
/proc, so the interpreter's own start counts): the imports, reading the corpus, the
process group (`mlx_model.distributed.process_group`), the model's build (`_fresh`), the
cuDNN attention library's load and check (`ops.cuda._import`, `checked_once`), the step
functions' setup, and the first 12 training steps, each as the call (on the first, MLX's
trace of the compiled step) and the wait for its loss (`mx.eval`); then each estimate and
each weight snapshot. With `--cli` also the command's own phases: the temporary Prefect
server's start (`start_early`, before the command's imports; `start_if_needed` takes it
over) and the wait for it to answer, the imports of the flows, `prepare` (the GPU's
libraries and, warm, one compiled step: `mlx_model.warmup.warm_process`, marked as ran or
skipped; `--no-warm-ahead` skips it, for the other side of an A/B), each stage's work
(`ArtifactStore.run`) and Prefect's flow- and task-run lines (the CLI prints the train
stage's own lines too). Waiting for every early step's loss holds the queue back, so the
steps after the first run a little slower than in a plain run; the estimates and
everything before the loop are as in one. A CLI run whose stages are cached times only
the cache hits: give a fresh `--artifacts` folder. Linux only (it reads /proc).
"""

from __future__ import annotations

import logging
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
    """One line on the process's standard error (the file itself: the CLI may have
    pointed sys.stderr at its log)."""
    os.write(2, f"[{time.perf_counter() - BASE:7.3f}] {what}\n".encode())


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


class Marks(logging.Handler):
    """Prefect's flow- and task-run lines (stage starts and ends) as marks."""

    def emit(self, record: logging.LogRecord) -> None:
        run = getattr(record, "task_run_name", None) or getattr(record, "flow_run_name", "")
        mark(f"prefect: {run}: {record.getMessage()[:100]}")


def instrument_training() -> None:
    """Mark the training's phases (`mlx_model.train`), its first steps and its estimates."""
    import mlx.core as mx

    import mlx_model.train as train
    from mlx_model.ops import cuda

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


def import_training() -> None:
    """Import numpy and `mlx_model.train`, marking each, and instrument the training."""
    import numpy  # noqa: F401

    mark("numpy imported")
    import mlx_model.train  # noqa: F401

    mark("mlx_model.train imported")
    instrument_training()


def instrument_cli(warm_ahead: bool) -> None:
    """Mark the CLI's phases (`flows.cli.main`), each stage's work and Prefect's lines;
    without `warm_ahead`, the compiled step is not run while the server boots."""
    import flows.cli as cli
    import flows.temporary_server as temporary_server
    from mlx_model import warmup

    mark("flows.cli imported")
    import_training()
    start = temporary_server.start_if_needed

    def start_timed():
        t = time.perf_counter()
        server = start()
        spent = time.perf_counter() - t
        mark(f"Prefect imported, the server taken over or started (start_if_needed): {spent:.3f} s")
        if server is not None:
            timed(server, "wait", "the server's wait until it answers (wait)")
        return server

    temporary_server.start_if_needed = start_timed
    timed(cli, "one_console")
    timed(cli, "import_flows", "the flows imported (import_flows)")
    timed(cli, "prepare", "the GPU's libraries and the step run ahead (prepare)")
    warm = warmup.warm_process if warm_ahead else (lambda cfg, tc: False)

    def warm_marked(cfg, tc):
        t = time.perf_counter()
        ran = warm(cfg, tc)
        what = "ran" if ran else "skipped" + ("" if warm_ahead else " (--no-warm-ahead)")
        mark(f"the compiled step run ahead (warm_process): {what}, {time.perf_counter() - t:.3f} s")
        return ran

    warmup.warm_process = warm_marked
    execute = cli.execute

    def execute_marked(args, params):
        for name in ("prefect.flow_runs", "prefect.task_runs"):
            logging.getLogger(name).addHandler(Marks())
        mark("execute")
        return execute(args, params)

    cli.execute = execute_marked
    from tasks.store import ArtifactStore

    run = ArtifactStore.run

    def run_timed(self, stage, *args, **kwargs):
        t = time.perf_counter()
        out = run(self, stage, *args, **kwargs)
        mark(f"stage {stage}'s work (ArtifactStore.run): {time.perf_counter() - t:.3f} s")
        return out

    ArtifactStore.run = run_timed


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return
    mark("interpreter up")
    cli = argv[:1] == ["--cli"]
    if "--cli" in argv[1:] or ("--no-warm-ahead" in argv and argv[1:2] != ["--no-warm-ahead"]):
        raise SystemExit("error: --cli comes first, then --no-warm-ahead if given (see --help)")
    warm_ahead = argv[1:2] != ["--no-warm-ahead"]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's packages
    if cli:
        import flows.entry as entry

        start_early = entry.start_early

        def start_early_timed(argv):
            t = time.perf_counter()
            server = start_early(argv)
            what = "started" if server is not None else "not started"
            mark(f"the server {what} (start_early): {time.perf_counter() - t:.3f} s")
            instrument_cli(warm_ahead)  # the command's imports, as `entry.main` takes them
            return server

        entry.start_early = start_early_timed
        code = entry.main(argv[1 if warm_ahead else 2 :])
        mark("end")
        raise SystemExit(code)
    import mlx_model  # noqa: F401  (before MLX: the BLAS it binds)

    mark("mlx_model (and mlx.core) imported")
    import_training()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import train_preset

    timed(train_preset, "corpus_splits")
    sys.argv = [str(Path(__file__).with_name("train_preset.py")), *sys.argv[1:]]
    train_preset.main()
    mark("end")


if __name__ == "__main__":
    main()
