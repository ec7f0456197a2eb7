"""Compile a run's GPU kernels in a separate process while the run trains uncompiled.

On a GPU with a cold kernel cache, the first compiled training step sits for about two
minutes while NVRTC compiles its fused kernels one after another (36 modules for
`nanogpt-char-fast` on an H200, MLX 0.32). A kernel module's name, and so its cache
entry, depends on the fused operations, dtypes and constants, not on shapes
(`mlx/backend/cuda/compiled.cpp`): the same step and loss estimate run on two windows
compile exactly the modules the real batch needs.

So a cold run starts this module as a child process (`python -m mlx_model.warmup`) on the
same configuration and trains op by op meanwhile (MLX must not be used from two threads
at once, hence a process). The child works in two stages, each published into the shared
kernel cache (`mlx_model.runtime.kernel_cache`) and recorded there:

1. the few kernels of functions compiled in their own right inside the layers (the
   GELU's, forward and backward: `nn.gelu_approx`, or `ops.gpu`'s in half precision), by
   running the step and estimate once op by op. The run's uncompiled steps run with MLX's
   compilation off until these are cached (compiling them in the run held its first
   steps back 4 to 5 s on an H200), and with them after (18% more tokens/s);
2. the whole compiled step and loss estimate; the run copies them in and switches to its
   compiled step, which then loads instead of compiling.

A run on a machine where cuDNN attention is not built yet computes attention with MLX's
operations while the extension builds in the background (`mlx_model.ops.cuda`); a second
child, beside the first (NVRTC compiles one module at a time per process: two processes
take half the time of one doing both), waits for that build and compiles the same two
stages for the step with cuDNN's attention, which the next runs use, so that they start
warm.

Uncompiled and compiled steps compute the same functions, so the losses agree within
float rounding.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import ops
from .config import GPTConfig, TrainConfig
from .ops import cuda
from .runtime import kernel_cache

ENV = "SHAKESPEARE_GPT_COMPILE_WARMUP"  # "0": compile in the run itself, as before
LOGS_ENV = "SHAKESPEARE_GPT_WARMUP_LOGS"  # a folder children move their logs to at the end
WINDOWS = 2  # sequences per warm-up batch: shapes do not change the kernels
CUDNN_BUILD_WAIT_S = 600  # how long the child waits for cuDNN attention's build


def signature(cfg: GPTConfig, tc: TrainConfig, ops_signature: dict[str, Any]) -> dict[str, Any]:
    """What decides the compiled step's kernels: the configurations (the schedule's
    numbers are constants in them), the ops backend, MLX's version and the project's code
    (`code_digest`: a marker written by other code is not taken as warm)."""
    import mlx.core as mx

    return {
        "model": cfg.to_dict(),
        "training": tc.to_dict(),
        "ops": ops_signature,
        "mlx": mx.__version__,
        "code": code_digest(),
    }


def run_signature(cfg: GPTConfig, tc: TrainConfig, world_size: int = 1) -> dict[str, Any]:
    """The signature a run of (cfg, tc) over `world_size` processes records its compiled
    step's kernels under: `signature` with the backend this process would use (cuDNN's
    attention or MLX's, as loaded now)."""
    sig = signature(cfg, tc, ops.signature(tc.compute_dtype, model=cfg))
    return {**sig, "world_size": world_size}


@functools.cache
def code_digest(root: Path = Path(__file__).parent) -> str:
    """SHA-256 (first 16 hex digits) of the package's sources under `root` (`.py`, and the
    extensions' C++): what the step's operations come from. A warm marker records it, so a
    run of other code (an upgrade that changed the optimizer's operations, say) does not
    take the cache as warm and compile for minutes in its first compiled step."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        if path.suffix in (".py", ".cpp", ".h") and "__pycache__" not in path.parts:
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def eager_signature(sig: dict[str, Any]) -> dict[str, Any]:
    """The marker of the first stage: the kernels the uncompiled steps use are cached."""
    return {**sig, "stage": "uncompiled steps"}


class Warmup:
    """A child process compiling the run's kernels into the shared cache, in two stages:
    first the few kernels of functions compiled in their own right inside the layers (the
    GELU's), which the run's uncompiled steps use; then the whole compiled step and loss
    estimate."""

    def __init__(
        self,
        proc: subprocess.Popen,
        cache: kernel_cache.KernelCache,
        log: Path,
        sig: dict[str, Any],
    ):
        self.proc = proc
        self.cache = cache
        self.log = log
        self.failed: str | None = None
        self._ended = False
        self._sig = sig
        self._eager = eager_signature(sig)
        self._eager_ready = False

    def eager_ready(self) -> bool:
        """True once the first stage is cached (its modules are then copied in), or the
        child has ended: the uncompiled steps may then let MLX compile its own layers,
        which load instead of compiling."""
        if not self._eager_ready and (
            self.cache.is_warm(self._eager) or self.proc.poll() is not None
        ):
            self.cache.refresh()
            self._eager_ready = True
        return self._eager_ready

    def ready(self) -> bool:
        """True once the child has cached this run's compiled step (its modules are then
        copied in; the child may go on to the step with cuDNN attention) or has ended; a
        failed child also reads as ready (the run then compiles for itself) and sets
        `failed`."""
        if self._ended:
            return True
        code = self.proc.poll()
        if code is None:
            if not self.cache.is_warm(self._sig):
                return False
            self.cache.refresh()
            return True
        if code != 0:
            try:
                tail = self.log.read_text(errors="replace")[-2000:]
            except OSError:  # moved by the child ($SHAKESPEARE_GPT_WARMUP_LOGS) or gone
                tail = ""
            self.failed = tail or f"exit code {code}"
        self.log.unlink(missing_ok=True)
        self.cache.refresh()
        self._ended = True  # asked again (at the run's end), it has nothing left to read
        return True

    def close(self) -> bool:
        """Leave a child that is still compiling to finish in the background (it fills the
        cache for the next run, and exits by itself); returns whether it still runs."""
        return not self.ready()


def start(cfg: GPTConfig, tc: TrainConfig, sig: dict[str, Any]) -> Warmup | None:
    """A warm-up for this run, or None when its kernels are cached, there is no kernel
    cache (no CUDA), or SHAKESPEARE_GPT_COMPILE_WARMUP=0."""
    cache = kernel_cache.active()
    if cache is None or os.environ.get(ENV) == "0" or cache.is_warm(sig):
        return None
    logs = cache.shared / ".warmup"
    logs.mkdir(parents=True, exist_ok=True)
    job = {"model": cfg.to_dict(), "training": tc.to_dict(), "signature": sig}
    proc, log = _spawn(logs, job)
    if cuda.building() and sig["ops"].get("attention") == "mlx":
        # this run computes attention with MLX's operations while cuDNN's is built in the
        # background: a second child, beside the first (NVRTC compiles one module at a
        # time per process), waits for the build and compiles the step the next runs use
        _spawn(logs, {**job, "cudnn": True})
    return Warmup(proc, cache, log, sig)


def _spawn(logs: Path, job: dict[str, Any]) -> tuple[subprocess.Popen, Path]:
    """A child `python -m mlx_model.warmup` doing `job`, its stderr in a new log under
    `logs`."""
    log = logs / f"{os.getpid()}-{os.urandom(4).hex()}.log"
    here = str(Path(__file__).resolve().parents[1])  # the child imports this mlx_model
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [here, os.environ.get("PYTHONPATH")])),
    }
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlx_model.warmup"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            start_new_session=True,  # a terminal's Ctrl-C goes to the run alone
        )
    proc.stdin.write(json.dumps({**job, "log": str(log)}).encode())
    proc.stdin.close()
    return proc, log


def compile_kernels(
    cfg: GPTConfig, tc: TrainConfig, compiled: bool = True, windows: int = WINDOWS
) -> None:
    """Run the training step and loss estimate of (cfg, tc) once on a batch of `windows`
    sequences of cfg.block_size tokens (tiny by default): compiled (every fused kernel of
    the run's compiled step), or op by op (`compiled=False`: only the kernels MLX compiles
    inside its own layers, which the uncompiled steps use). The model and optimizer are
    built here and discarded."""
    import mlx.core as mx
    import numpy as np

    from .data import get_batch
    from .train import DTYPES, _fresh, make_loss_sum, make_step

    dtype = DTYPES[tc.compute_dtype]
    model, optimizer = _fresh(cfg, tc)
    ids = np.arange(windows * (cfg.block_size + 1)) % cfg.vocab_size
    x, y = map(mx.array, get_batch(ids, np.arange(windows), cfg.block_size))  # as the run's
    model.train()
    step = make_step(model, optimizer, tc, dtype, compiled=compiled)
    mx.eval(step(x, y), model.parameters(), optimizer.state)
    model.eval()
    mx.eval(make_loss_sum(model, dtype, compiled=compiled)(x, y))


def warm_process(cfg: GPTConfig, tc: TrainConfig) -> bool:
    """Run (cfg, tc)'s compiled training step and loss estimate once in this process, on
    one batch of the run's shape (tc.batch_size sequences of cfg.block_size tokens), when
    the kernel cache records that configuration's kernels as compiled (`run_signature`,
    one process); returns whether it ran.

    What the process keeps from it: the kernel modules MLX loads from its cache, cuDNN
    attention's plans for these shapes, the matrix library's handles and choices. A
    command that waits for something else first (the CLI, while Prefect's temporary
    server boots) does this meanwhile: on an H200 it took 0.97 to 1.45 s there, and the
    run's first step then took 0.018 to 0.026 s to its loss, the next following at once,
    against 0.57 to 0.64 s to its loss and about 0.46 s more to the next without it
    (`bench/start_timeline.py --cli`, docs/runs/cli-timeline-h200-20261201n-*warm-*.txt).
    Nothing runs without a kernel cache (a CPU process) or with the kernels not cached
    yet: compiling them here would be the minutes the warm-up child exists to keep out
    of the way. The signature holds the model's vocabulary size, which the train stage
    sets from the corpus: a corpus whose vocabulary is not cfg.vocab_size's size (the
    presets': 65, Tiny Shakespeare's) is not run ahead. The run's own weights and losses
    do not change (bit for bit on the CPU, `tests/test_kernel_cache.py`): `_fresh` seeds
    from tc.seed, and the loop seeds each step."""
    cache = kernel_cache.active()
    if cache is None or not cache.is_warm(run_signature(cfg, tc)):
        return False
    cache.refresh()  # modules a warm-up child published after this process started
    compile_kernels(cfg, tc, windows=tc.batch_size)
    return True


def main() -> int:
    """The child: compile the uncompiled steps' kernels, publish, record that stage; then
    the compiled step's, publish, record the signature as warm. One child per signature
    compiles at a time (a lock in the cache); another waits for it, then finds the
    kernels cached and only copies them in. The second child of a run that uses MLX's
    attention while cuDNN's is being built (`"cudnn"` in its job) waits for that build
    and does the same for the step with cuDNN's attention, which the next runs use."""
    job = json.loads(sys.stdin.read())
    cfg, tc = GPTConfig.from_dict(job["model"]), TrainConfig.from_dict(job["training"])
    cache = kernel_cache.active()
    if cache is None:
        compile_kernels(cfg, tc)
        return 0
    log = Path(job["log"]) if "log" in job else None
    if not job.get("cudnn"):
        _compile_into(cache, cfg, tc, job["signature"])
    else:
        try:
            _cudnn_step(cache, cfg, tc, job["signature"])
        except BaseException:
            # no run reads this child's log: keep it, named as failed, for whoever looks
            # (the traceback still goes to it, through this process's stderr)
            if log is not None:
                _retire(log, failed=True)
            raise
    # the log (this process's stderr) is read by the run only on a failure; a child that
    # outlived its run would otherwise leave it behind
    if log is not None:
        _retire(log)
    return 0


def _retire(log: Path, failed: bool = False) -> None:
    """A child's log at its end: moved into $SHAKESPEARE_GPT_WARMUP_LOGS where that is set
    (a benchmark reading where the time went), else removed, or kept as `<log>.failed`."""
    keep = os.environ.get(LOGS_ENV)
    name = log.name + (".failed" if failed else "")
    try:
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            os.replace(log, Path(keep) / name)
        elif failed:
            os.replace(log, log.with_name(name))
        else:
            log.unlink(missing_ok=True)
    except OSError:  # gone already (the run removed it); nothing to keep
        pass


def _compile_into(
    cache: kernel_cache.KernelCache, cfg: GPTConfig, tc: TrainConfig, sig: dict[str, Any]
) -> None:
    """Both stages for `sig`, each published and recorded, unless already warm."""
    attention = sig["ops"].get("attention", "")
    start = time.monotonic()
    with cache.lock(sig):
        _say(f"{attention}: lock taken after {time.monotonic() - start:.1f} s")
        if not cache.is_warm(sig):
            cache.refresh()
            if not cache.is_warm(eager_signature(sig)):
                compile_kernels(cfg, tc, compiled=False)  # seconds: the run waits for these
                cache.publish()
                cache.mark_warm(eager_signature(sig))
                _say(f"{attention}: uncompiled steps' kernels at {time.monotonic() - start:.1f} s")
            cache.refresh()  # what another child published meanwhile loads, not compiles
            compile_kernels(cfg, tc)
            cache.publish()
            cache.mark_warm(sig)
            _say(f"{attention}: compiled step's kernels at {time.monotonic() - start:.1f} s")


def _cudnn_step(
    cache: kernel_cache.KernelCache, cfg: GPTConfig, tc: TrainConfig, sig: dict[str, Any]
) -> None:
    """Once cuDNN attention's background build is done, the kernels of the same step with
    cuDNN's attention, under the signature the next run will have."""
    start = time.monotonic()
    built = cuda.wait_built(CUDNN_BUILD_WAIT_S)
    _say(f"cuDNN attention's build waited for {time.monotonic() - start:.1f} s: {built}")
    if not built:
        return  # failed (its log says why) or still building: the next run compiles
    cuda.pin("cudnn")
    if cuda.load() is None:
        return
    _compile_into(cache, cfg, tc, {**sig, "ops": {**sig["ops"], "attention": "cudnn"}})


def _say(line: str) -> None:
    """A line of the child's log (its stderr): where its time went, read on a failure."""
    print(f"warm-up {line}", file=sys.stderr, flush=True)


if __name__ == "__main__":  # importing mlx_model first installed the kernel cache
    raise SystemExit(main())
