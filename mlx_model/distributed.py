"""Data-parallel training through MLX's own launcher, `mlx.launch`.

The parent (`train_distributed`) writes the run's spec to a JSON file and starts
`mlx.launch`, which starts one process per rank (NCCL on NVIDIA GPUs, ring over TCP on
any machine, or MPI). Each rank runs this module's `__main__`: the ordinary training
loop (`mlx_model.train.train`), which finds its group through `process_group`.
Rank 0 prints its progress as marked JSON lines on stdout; the parent turns them back
into `Progress` callbacks. When a rank dies, `mlx.launch` stops the others and names
it; the parent raises `RankFailedError` with that rank, and the latest checkpoint
(written by rank 0 only, atomically) stays usable for a rerun with the same layout. On one
host the ranks' ports are a block found free (`port_block`); a launch whose rank could not
bind its port fails before any progress and is made again on another block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from .config import GPTConfig, ParallelConfig, TrainConfig
from .files import write_text_atomic
from .ops import cuda
from .runtime.lanes import cpu_lanes

# what launchers set in each process they start: mlx.launch MLX_RANK (every backend but MPI),
# Open MPI's mpirun OMPI_COMM_WORLD_SIZE, MPICH's and PMIx's PMI_SIZE and PMIX_RANK
LAUNCHED_ENV = ("MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")
PROGRESS = "@@progress "
RESULT = "@@result "
DIVERGED = "@@diverged "  # rank 0's TrainingDiverged, as JSON of its arguments
SPEC = "launch.json"
_LAUNCH = "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())"
_RANK_FAILED = re.compile(r"Node with rank (\d+) (exited with code (-?\d+)|was killed)")
# terminal colour codes in the launcher's stderr: a line of them alone (a colour's reset
# after a rank's traceback) is no error line
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class RankFailedError(RuntimeError):
    """A rank of a data-parallel run died; the message names it."""


BIND_FAILED = "Couldn't bind socket"  # MLX's error when a port a rank binds was taken
LAUNCH_ATTEMPTS = 3  # launches on fresh ports when a rank could not bind its own
MAX_PORTS = 1024  # the most ports one `port_block` takes (a process each, and NCCL's)


def _ephemeral_ports() -> tuple[int, int]:
    """The range the kernel takes outgoing connections' ports from: Linux's setting, or
    its default 32768-60999 where that cannot be read; IANA's 49152-65535 elsewhere, as
    macOS and Windows use."""
    with contextlib.suppress(OSError, ValueError):
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    return (32768, 60999) if sys.platform.startswith("linux") else (49152, 65535)


def port_block(count: int, rng: random.Random | None = None) -> int:
    """The first of `count` consecutive TCP ports that are free on 127.0.0.1 now.

    MLX's ring backend gives rank i the port `--starting-port` + i, so one free port is not
    enough. The block lies outside the ephemeral range (from port 10000 up to it, or above
    it where it starts lower), where no outgoing connection takes a port meanwhile; the
    ports are bound to check them and closed again, so a process may still take one
    before the ranks bind (`train_distributed` then launches again).

    Raises ValueError for a count outside 1..MAX_PORTS, and RuntimeError when no block
    fits outside the ephemeral range or 200 random blocks were all partly taken."""
    if not isinstance(count, int) or not 1 <= count <= MAX_PORTS:
        raise ValueError(f"port_block takes 1 to {MAX_PORTS} ports, got {count!r}")
    rng = rng or random.Random()
    low, high = _ephemeral_ports()
    spans = [(10000, low - count), (high + 1, 65536 - count)]  # starts, end excluded
    spans = [(a, b) for a, b in spans if b > a]
    if not spans:
        raise RuntimeError(
            f"no room for {count} consecutive ports outside the ephemeral range {low}-{high}"
        )
    for _ in range(200):
        a, b = rng.choice(spans) if len(spans) > 1 else spans[0]
        start = rng.randrange(a, b)
        with contextlib.ExitStack() as stack:
            try:
                for port in range(start, start + count):
                    sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return start
    raise RuntimeError(f"no {count} consecutive free TCP ports on 127.0.0.1 in 200 tries")


def backend(parallel: ParallelConfig) -> str:
    """The launcher backend: `auto` is NCCL where CUDA is available, else ring."""
    if parallel.backend != "auto":
        return parallel.backend
    import mlx.core as mx

    return "nccl" if mx.cuda.is_available() else "ring"


def rank_lanes(parallel: ParallelConfig) -> int:
    """CPU lanes per process: the cores of one machine shared between its ranks."""
    return max(1, cpu_lanes() // (1 if parallel.hostfile else parallel.processes))


def launch_command(parallel: ParallelConfig, spec: Path) -> list[str]:
    """The `mlx.launch` command line that runs every rank on `spec`."""
    cmd = [sys.executable, "-c", _LAUNCH, "--backend", backend(parallel)]
    if parallel.hostfile:
        cmd += ["--hostfile", parallel.hostfile]
    else:  # one host: this machine, its cores shared between the ranks
        cmd += ["--hosts", "127.0.0.1", "-n", str(parallel.processes)]
        cmd += ["--env", f"SHAKESPEARE_GPT_CPU_LANES={rank_lanes(parallel)}"]
        start = port_block(parallel.processes + 1)  # the ring's ports, then NCCL's
        cmd += ["--starting-port", str(start), "--nccl-port", str(start + parallel.processes)]
    if os.environ.get(cuda.ENV):  # the attention this run chose, on every host's ranks
        cmd += ["--env", f"{cuda.ENV}={os.environ[cuda.ENV]}"]
    return [*cmd, "--python", sys.executable, "--", "-m", __name__, str(spec)]


def train_distributed(
    cfg: GPTConfig,
    tc: TrainConfig,
    parallel: ParallelConfig,
    train_path: Path,
    val_path: Path,
    out_dir: Path,
    callback: Callable | None = None,
    stop_after: int | None = None,
):
    """Train over `parallel.world_size` processes; return rank 0's `TrainResult`.
    `stop_after` ends the run at that step, as `mlx_model.train.train`'s does.

    Raises the run's `TrainingDiverged`, or RankFailedError naming the rank that failed
    first. On one host, a launch whose rank could not bind its port (taken after
    `port_block` checked it) fails before any step and is made again on other ports, up
    to `LAUNCH_ATTEMPTS` launches in all."""

    out_dir = Path(out_dir)
    spec = out_dir / SPEC
    write_text_atomic(
        spec,
        json.dumps(
            {
                "model": cfg.to_dict(),
                "training": tc.to_dict(),
                "train": str(Path(train_path).resolve()),
                "val": str(Path(val_path).resolve()),
                "out_dir": str(out_dir.resolve()),
                "stop_after": stop_after,
            }
        ),
    )
    # a port taken between port_block's check and the ranks' bind fails the launch before
    # any progress: launch again on other ports (a hostfile's ports are the user's)
    attempts, launches = (1 if parallel.hostfile else LAUNCH_ATTEMPTS), 0
    while True:
        result, diverged, errors, code, started = _launch(parallel, spec, callback)
        launches += 1
        if result is not None:
            return result
        if diverged is not None:
            raise diverged
        if started or launches == attempts or not any(BIND_FAILED in e for e in errors):
            break
    message = _failure(errors, parallel, out_dir, code)
    if launches > 1:
        message += f" ({launches} launches, each on other ports)"
    raise RankFailedError(message)


def _launch(parallel: ParallelConfig, spec: Path, callback: Callable | None):
    """Run `mlx.launch` once; return rank 0's result or divergence (each None when it did
    not come), the launcher's stderr lines, its exit status and whether rank 0 reported
    any progress (a step, or the resume line before the first)."""
    from .train import Progress, TrainingDiverged, TrainResult

    proc = subprocess.Popen(
        launch_command(parallel, spec),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    errors: list[str] = []
    reader = threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True)
    reader.start()
    result = diverged = None
    started = False
    for line in proc.stdout:
        if line.startswith(PROGRESS):
            started = True
            if callback:
                callback(Progress(**json.loads(line[len(PROGRESS) :])))
        elif line.startswith(RESULT):
            result = TrainResult(**json.loads(line[len(RESULT) :]))
        elif line.startswith(DIVERGED):
            diverged = TrainingDiverged(*json.loads(line[len(DIVERGED) :]))
    proc.wait()
    reader.join()
    return result, diverged, errors, proc.returncode, started


def _failure(errors: list[str], parallel: ParallelConfig, out_dir: Path, code: int) -> str:
    errors = [_ANSI.sub("", e) for e in errors]
    failed = [m for m in map(_RANK_FAILED.search, errors) if m]
    # the first rank to fail is the cause; the others were stopped by the launcher
    cause = next((m for m in failed if m.group(3) not in ("-15", "143")), None) or (
        failed[0] if failed else None
    )
    what = (
        f"rank {cause.group(1)} of {parallel.world_size} "
        + ("was killed" if cause.group(2) == "was killed" else f"exited with code {cause.group(3)}")
        if cause
        else f"the launcher exited with code {code} before rank 0 finished"
    )
    # the ranks' own last error, not the launcher's lines about them
    last = next(
        (e.strip() for e in reversed(errors)
         if e.strip() and "[WARN]" not in e and not _RANK_FAILED.search(e)),
        "",
    )  # fmt: skip
    detail = f" (last error line: {last[-300:]})" if last else ""
    return (
        f"data-parallel training failed: {what}{detail}. The latest checkpoint in "
        f"{out_dir / 'latest'} is kept; rerun with the same layout to resume from it."
    )


def process_group():
    """This process's `mx.distributed.Group` (size, rank): from MLX's backends when a
    launcher started it (`LAUNCHED_ENV`; MLX raises nothing and returns a group of one
    where none answers), else a group of one without asking them. MLX's own search
    (`mx.distributed.init()`) tries MPI too, which loads the MPI library and runs MPI_Init
    where one is installed: 0.39 s of a single process's start on an H200 host
    (docs/BENCHMARKS.md). Under the ring backend's name, without its environment, MLX
    makes the group of one and loads nothing; MLX files it under that name only, so code
    that needs the group calls this, not `mx.distributed.init()`."""
    import mlx.core as mx

    if any(name in os.environ for name in LAUNCHED_ENV):
        return mx.distributed.init()
    return mx.distributed.init(backend="ring")


def main(spec_path: str) -> None:
    """One rank: train on the spec's files; rank 0 reports on stdout."""
    from .data import read_tokens
    from .train import TrainingDiverged, train

    spec = json.loads(Path(spec_path).read_text())
    train_ids, _ = read_tokens(Path(spec["train"]))
    val_ids, _ = read_tokens(Path(spec["val"]))
    rank = process_group().rank()

    def emit(progress) -> None:
        print(PROGRESS + json.dumps(dataclasses.asdict(progress)), flush=True)

    try:
        result = train(
            GPTConfig.from_dict(spec["model"]),
            TrainConfig.from_dict(spec["training"]),
            train_ids,
            val_ids,
            Path(spec["out_dir"]),
            callback=emit,
            stop_after=spec["stop_after"],
        )
    except TrainingDiverged as err:  # every rank sees the same reduced loss
        if rank == 0:
            print(DIVERGED + json.dumps(err.args), flush=True)
        raise SystemExit(1) from None
    if rank == 0:
        print(RESULT + json.dumps(dataclasses.asdict(result)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
