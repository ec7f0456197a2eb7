"""GPU: how long from a cold start, and from a warm one, to validation loss 1.47, this
project against the PyTorch reference; and each side's tok/s and MFU at nanogpt-char's shape.

    python bench/gpu_race.py --corpus input.txt [--rounds 2] [--out race-logs]

One call, one GPU; each run is a fresh process, timed by this script from the moment it
starts the process (imports, model build and compilation included) to the moment the run
prints its first loss estimate at or below `--target`. The project's side is
`bench/train_preset.py --preset nanogpt-char-fast`; the reference is `bench/torch_gpu.py
--preset nanogpt-char` (nanoGPT's recipe in PyTorch: `torch.compile`, bfloat16 autocast,
fused AdamW), on the same batches, the same model shape and the same estimate schedule.

Cold means empty caches, as on a fresh machine: MLX's kernel cache (`MLX_PTX_CACHE_DIR`),
the project's built libraries (`XDG_CACHE_HOME`: cuDNN attention, built by the first run),
`torch.compile`'s (`TORCHINDUCTOR_CACHE_DIR`, `TRITON_CACHE_DIR`), the CUDA driver's
(`CUDA_CACHE_PATH`) and Prefect's home (`PREFECT_HOME`: its database, which the first
`--cli` run creates) point to new folders under `--out`. Warm rounds reuse those folders.
Order: project cold, then a wait until the project's kernel warm-up child (which outlives
a short cold run) has finished, reference cold, then `--rounds` rounds of project warm,
reference warm (alternating, so a slow spell of the machine falls on both sides).
`--project-only` leaves the reference out. `--warm-only` skips the cold runs and reuses the
caches an earlier call's cold runs left under the same `--out` (MLX's kernels marked warm,
the reference's `torch.compile` cache, with `--cli` Prefect's database); it refuses, naming
them, where they are missing.

tok/s: the project's is the median of its log intervals (50 steps) that hold no estimate
and are not its first; the reference's is its own steady figure (steps 20 to the end,
estimates excluded). Each warm round also trains the reference's own recipe (nanogpt-char:
AdamW) in the project for `--throughput-steps` steps without estimates
("project-same-recipe"), so that the step is compared on the same arithmetic too.
MFU: tok/s times nanoGPT's FLOPs per token (6N + 12 L C T), over the GPU's dense bfloat16
peak (`--peak-tflops`, 989 for an H100 or H200 SXM).

Prints a line per run, then one JSON line with every run and the summary. Each run's
output is kept in `--out` as `<side>-<cache>-<round>.log`, the cold run's kernel warm-up
children's logs (each stage's time) in `--out`'s `warm-up-logs/`.

`--cli` times `shakespeare-gpt run --preset P` itself on the project's side (every stage,
a temporary Prefect server unless `PREFECT_API_URL` names one, a new artifact folder per
run so that nothing is cached but the kernels), as the issue's goal is worded; without it,
the training alone (`bench/train_preset.py`).

`--smoke` checks the plumbing on a machine without a GPU: both sides on the CPU, the
`tiny` preset, target 10 (the first estimate), the reference without `torch.compile`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
# bench/train_preset.py --every-log prints `step N train X val Y ...` and `log N S s T tok/s`;
# the CLI (`--cli`) logs `... step N/M  train X  val Y ...` and
# `... step N/M  loss X  lr L  T tok/s`
ESTIMATE = re.compile(r"(?:^|\s)step (\d+)(?:/\d+)? +train ([0-9.]+) +val ([0-9.]+)")
LOG = re.compile(
    r"^log (\d+) ([0-9.]+) s ([0-9.]+) tok/s|\sstep (\d+)/\d+ +loss .* ([0-9.]+) tok/s"
)


@dataclass
class Run:
    side: str  # "project" or "reference"
    cache: str  # "cold" or "warm"
    round: int
    rc: int | None = None
    seconds_to_target: float | None = None  # from process start
    step_at_target: int | None = None
    val_at_target: float | None = None
    tokens_per_sec: float | None = None
    mfu: float | None = None
    log: str = ""
    result: dict = field(default_factory=dict)  # the run's own JSON line


def first_at_target(
    lines: list[tuple[float, str]], target: float
) -> tuple[float, int, float] | None:
    """(seconds, step, val) of the first estimate line `step N train X val Y` with Y <= target,
    from lines timestamped in seconds since the process started; None if there is none."""
    for seconds, line in lines:
        m = ESTIMATE.search(line)
        if m and float(m.group(3)) <= target:
            return seconds, int(m.group(1)), float(m.group(3))
    return None


def steady_tokens_per_sec(lines: list[str]) -> float | None:
    """Median tok/s of `log STEP SECONDS s TOK tok/s` intervals, leaving out the first
    (compilation) and any that follows an estimate line (the estimate's time falls in it)."""
    rates, after_estimate, first = [], False, True
    for line in lines:
        if ESTIMATE.search(line):
            after_estimate = True
            continue
        m = LOG.search(line)
        if not m:
            continue
        if not first and not after_estimate:
            rates.append(float(m.group(3) or m.group(5)))
        first, after_estimate = False, False
    return statistics.median(rates) if rates else None


def last_json(lines: list[str]) -> dict:
    """The last line that parses as a JSON object (each bench prints its result so)."""
    for line in reversed(lines):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return {}


def flops_per_token(n_layer: int, n_emb: int, block_size: int, vocab_size: int) -> float:
    """nanoGPT's estimate (its `estimate_mfu`): 6N for N parameters without the position
    embedding, plus 12 L C T for the attention scores and values."""
    n = vocab_size * n_emb + n_layer * (12 * n_emb * n_emb + 13 * n_emb) + 2 * n_emb
    return 6 * n + 12 * n_layer * n_emb * block_size


def timed_lines(cmd: list[str], env: dict, timeout: float, log: Path) -> tuple[int | None, list]:
    """Run cmd, timestamping each line of its output (stdout and stderr together) in seconds
    since the process was started; the lines also go to `log`. rc None: killed at `timeout`."""
    lines = []
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=HERE.parent,  # `python -m flows` from the checkout
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        killed = threading.Event()
        watchdog = threading.Timer(timeout, lambda: (killed.set(), proc.kill()))
        watchdog.start()
        try:
            for line in proc.stdout:
                t = time.perf_counter() - t0
                out.write(f"[{t:8.2f}] {line}")
                lines.append((t, line.rstrip("\n")))
            rc = proc.wait()
        finally:
            watchdog.cancel()
    return (None if killed.is_set() else rc), lines


def measure(run: Run, cmd: list[str], env: dict, args, flops: float) -> Run:
    rc, lines = timed_lines(cmd, env, args.timeout, Path(run.log))
    text = [line for _, line in lines]
    run.rc = rc
    run.result = last_json(text)
    hit = first_at_target(lines, args.target)
    if hit:
        run.seconds_to_target, run.step_at_target, run.val_at_target = round(hit[0], 1), *hit[1:]
    if run.side.startswith("project"):
        run.tokens_per_sec = steady_tokens_per_sec(text)
    else:
        run.tokens_per_sec = run.result.get("tokens_per_sec")
    if run.tokens_per_sec:
        run.tokens_per_sec = round(run.tokens_per_sec)
        run.mfu = round(run.tokens_per_sec * flops / (args.peak_tflops * 1e12), 4)
    return run


def wait_for_warm_up(mlx_cache: Path, timeout: float, keep: Path | None = None) -> float | None:
    """After the project's cold run: wait until its kernel warm-up children (which go on
    compiling in the background after a short run; after a run that built cuDNN attention
    in the background, a second one compiles the step with it) have finished: one has
    recorded a compiled step as warm in `mlx_cache/.warm` (the first stage's marker does
    not count) and none has a log left in `.warmup` (a child moves or removes its log when
    it ends). Returns the seconds waited; None when no warm-up was started (no `.warmup`
    folder: a CPU, or warm-up turned off) or it did not finish in `timeout`. The logs of
    children still running then are copied into `keep` (finished ones went there
    themselves: `mlx_model.warmup.LOGS_ENV`)."""
    if not (mlx_cache / ".warmup").is_dir():
        return None
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        warm = any(_compiled_step_marker(m) for m in (mlx_cache / ".warm").glob("*"))
        if warm and not any((mlx_cache / ".warmup").glob("*.log")):
            return round(time.perf_counter() - t0, 1)
        time.sleep(0.5)
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        for log in (mlx_cache / ".warmup").glob("*.log"):
            try:
                (keep / log.name).write_bytes(log.read_bytes())
            except OSError:  # it ended meanwhile, and moved or removed its log
                pass
    return None


def _compiled_step_marker(path: Path) -> bool:
    """Whether `path` records a whole compiled step as warm: a marker (not a lock or a
    temp file) whose signature names no stage (`mlx_model.warmup.eager_signature`)."""
    if path.name.endswith(".lock") or path.name.startswith("."):
        return False
    try:
        return "stage" not in json.loads(path.read_text())
    except (OSError, ValueError):
        return False


ARTIFACTS = "{artifacts}"  # in a --cli command: each run's own artifact folder


def commands(args, sections: dict[str, str] | None = None) -> dict[str, list[str]]:
    """Each side's command. With `--cli` the project's is `shakespeare-gpt run` (as
    `python -m flows run`, from the checkout), its `--set` items in the CLI's
    SECTION.FIELD form (`sections` maps each field to its section)."""
    py = sys.executable
    common = ["--corpus", args.corpus, "--target", str(args.target)]
    if args.cli:
        source = Path(args.corpus).resolve().as_uri()
        project = [py, "-m", "flows", "run", "--preset", args.preset, "--source", source]
        project += ["--artifacts", ARTIFACTS] + (["--verbose"] if args.verbose else [])
        for item in args.set:
            project += ["--set", f"{(sections or {})[item.partition('=')[0]]}.{item}"]
    else:
        project = [py, str(HERE / "train_preset.py"), "--preset", args.preset, "--every-log"]
        project += common + [a for s in args.set for a in ("--set", s)]
    reference = [py, str(HERE / "torch_gpu.py"), "--preset", args.reference_preset] + common
    if args.smoke:
        reference += ["--device", "cpu", "--no-compile"]
    # the reference's own recipe (AdamW) in the project, no estimates: tok/s alone
    same_recipe = [py, str(HERE / "train_preset.py"), "--preset", args.reference_preset]
    same_recipe += ["--corpus", args.corpus, "--every-log", "--set", "eval_interval=1000"]
    same_recipe += ["--stop-after", str(args.throughput_steps)]
    return {"project": project, "reference": reference, "project-same-recipe": same_recipe}


def summary(runs: list[Run]) -> dict:
    """Per side: cold seconds to target, warm range, tok/s and MFU ranges; and the
    project/reference ratios of the warm rounds, each round against its own partner."""

    def span(values):
        values = [v for v in values if v is not None]
        return [min(values), max(values)] if values else None

    out: dict = {}
    for side in ("project", "reference", "project-same-recipe"):
        mine = [r for r in runs if r.side == side]
        out[side] = {
            "cold_seconds_to_target": next(
                (r.seconds_to_target for r in mine if r.cache == "cold"), None
            ),
            "warm_seconds_to_target": span(r.seconds_to_target for r in mine if r.cache == "warm"),
            "steps_to_target": span(r.step_at_target for r in mine),
            "tokens_per_sec": span(r.tokens_per_sec for r in mine),
            "mfu": span(r.mfu for r in mine),
        }
    pairs = {}
    for r in runs:
        pairs.setdefault((r.cache, r.round), {})[r.side] = r
    ratios = {"seconds_to_target": [], "tokens_per_sec": [], "same_recipe_tokens_per_sec": []}
    for pair in pairs.values():
        q = pair.get("reference")
        for key, side, attr in (
            ("seconds_to_target", "project", "seconds_to_target"),
            ("tokens_per_sec", "project", "tokens_per_sec"),
            ("same_recipe_tokens_per_sec", "project-same-recipe", "tokens_per_sec"),
        ):
            p = pair.get(side)
            if p and q and getattr(p, attr) and getattr(q, attr):
                ratios[key].append(round(getattr(p, attr) / getattr(q, attr), 3))
    out["project_over_reference"] = ratios
    return out


def doc_parser(doc: str) -> argparse.ArgumentParser:
    """A parser whose --help is a bench's module docstring: its first paragraph as the
    description, the rest verbatim after the options."""
    first, _, rest = doc.partition("\n\n")
    return argparse.ArgumentParser(
        description=first, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = doc_parser(__doc__)
    p.add_argument("--corpus", required=True, help="Tiny Shakespeare's input.txt")
    p.add_argument(
        "--out", default=None, help="folder for the logs and caches (default: a new temp dir)"
    )
    p.add_argument(
        "--rounds", type=int, default=2, help="warm rounds per side (default 2; 0: cold runs only)"
    )
    p.add_argument(
        "--target", type=float, default=None, help="validation loss to reach (default 1.47)"
    )
    p.add_argument(
        "--preset", default=None, help="the project's preset (default nanogpt-char-fast)"
    )
    p.add_argument(
        "--reference-preset", default=None, help="the reference's (default nanogpt-char)"
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a field of the project's preset",
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds per run (default 600)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=989.0,
        help="dense bfloat16 peak of the GPU (default 989: H100/H200 SXM)",
    )
    p.add_argument(
        "--throughput-steps",
        type=int,
        default=400,
        help="each warm round also trains the reference's recipe (--reference-preset) in the "
        "project for this many steps without estimates, for tok/s alone (0: not)",
    )
    p.add_argument(
        "--project-only", action="store_true", help="time the project alone, no reference runs"
    )
    p.add_argument(
        "--warm-only",
        action="store_true",
        help="no cold runs: the warm rounds reuse the caches an earlier call left in --out",
    )
    p.add_argument(
        "--cli",
        action="store_true",
        help="the project's side runs `shakespeare-gpt run` (Prefect, every stage) instead of "
        "bench/train_preset.py (training alone)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="with --cli, the command's --verbose: Prefect's own lines (each stage's start "
        "and end), which say where the seconds before training go",
    )
    p.add_argument(
        "--smoke", action="store_true", help="check the plumbing on the CPU: tiny preset, target 10"
    )
    args = p.parse_args(argv)
    if args.rounds < 0:
        p.error(f"--rounds must be >= 0, got {args.rounds}")
    if args.warm_only and args.out is None:
        p.error("--warm-only needs --out: an earlier call's, with its caches")
    if args.warm_only and args.rounds == 0:
        p.error("--warm-only runs warm rounds alone: give --rounds 1 or more")
    if args.verbose and not args.cli:
        p.error("--verbose goes with --cli (bench/train_preset.py has no Prefect lines)")
    if args.throughput_steps < 0:
        p.error(f"--throughput-steps must be >= 0, got {args.throughput_steps}")
    if not Path(args.corpus).is_file():
        p.error(f"--corpus: no such file: {args.corpus}")
    small = args.smoke
    args.target = args.target if args.target is not None else (10.0 if small else 1.47)
    args.preset = args.preset or ("tiny" if small else "nanogpt-char-fast")
    args.reference_preset = args.reference_preset or ("tiny" if small else "nanogpt-char")
    return args


def shape(preset: str, sets: list[str] = ()) -> tuple[int, int, int]:
    """(n_layer, n_emb, block_size) of a preset with the `--set` items applied."""
    return tuple(preset_info(preset, sets)["shape"])


def preset_info(preset: str, sets: list[str] = ()) -> dict:
    """{"shape": [n_layer, n_emb, block_size], "sections": {field: "model" or "training"}}
    of a preset with the `--set` items applied, read in a child process so that this
    script imports neither MLX nor PyTorch. Raises ValueError with the child's one-line
    message for an unknown preset or a bad `--set`."""
    code = (
        "import sys, json; sys.path[:0] = sys.argv[1:3]; "
        "from mlx_model.config import get_preset; from train_preset import apply_sets\n"
        "try:\n"
        "    p = get_preset(sys.argv[3]); m, _ = apply_sets(p.model, p.train, sys.argv[4:])\n"
        "except ValueError as err:\n"
        "    sys.exit(str(err))\n"
        "names = [item.partition('=')[0] for item in sys.argv[4:]]\n"
        "sections = {n: 'model' if n in m.to_dict() else 'training' for n in names}\n"
        "print(json.dumps({'shape': [m.n_layer, m.n_emb, m.block_size], 'sections': sections}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(HERE.parent), str(HERE), preset, *sets],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise ValueError(out.stderr.strip().splitlines()[-1] if out.stderr.strip() else preset)
    return json.loads(out.stdout.strip().splitlines()[-1])


def warm_gaps(caches: Path, args: argparse.Namespace) -> list[str]:
    """What a warm round needs under `caches` and does not find: MLX's kernels marked warm
    (on a GPU), the reference's `torch.compile` cache, and with `--cli` Prefect's database,
    each left by a cold run of the same kind."""
    gaps = []
    marked = caches / "mlx" / ".warm"
    if not args.smoke and not (marked.is_dir() and any(marked.iterdir())):
        gaps.append(f"{marked} (MLX's kernels, marked warm by the project's cold run)")
    inductor = caches / "inductor"
    if (
        not args.smoke
        and not args.project_only
        and not (inductor.is_dir() and any(inductor.iterdir()))
    ):
        gaps.append(f"{inductor} (the reference's torch.compile cache, from its cold run)")
    if args.cli and not (caches / "prefect" / "prefect.db").is_file():
        gaps.append(f"{caches / 'prefect' / 'prefect.db'} (Prefect's database, from a --cli run)")
    return gaps


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.out or tempfile.mkdtemp(prefix="gpu-race-"))
    out.mkdir(parents=True, exist_ok=True)
    try:
        info = preset_info(args.preset, args.set)
        n_layer, n_emb, block = info["shape"]
        shape(args.reference_preset)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    vocab = len(set(Path(args.corpus).read_text()))  # the character vocabulary, 65
    flops = flops_per_token(n_layer, n_emb, block, vocab)
    caches = out / "caches"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env |= {
        "MLX_PTX_CACHE_DIR": str(caches / "mlx"),
        "XDG_CACHE_HOME": str(caches / "home"),  # cuDNN attention and other built libraries
        "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"),
        "TRITON_CACHE_DIR": str(caches / "triton"),
        "CUDA_CACHE_PATH": str(caches / "nv"),  # the driver's own (PTX compiled to SASS)
        "PREFECT_HOME": str(caches / "prefect"),  # --cli: a new machine has no Prefect database
        "SHAKESPEARE_GPT_WARMUP_LOGS": str(out / "warm-up-logs"),  # where each child's time went
    }
    if args.warm_only and (gaps := warm_gaps(caches, args)):
        print(
            f"error: --warm-only reuses the caches an earlier call's cold runs left in "
            f"{out}, and these are missing: {'; '.join(gaps)}",
            file=sys.stderr,
        )
        sys.exit(2)
    if not args.warm_only and caches.exists() and any(caches.iterdir()):
        print(
            f"error: {caches} is not empty: a cold run needs empty caches (give a new --out)",
            file=sys.stderr,
        )
        sys.exit(2)
    cmds = commands(args, info["sections"])
    if args.cli:  # plain log lines, no progress bar
        env["SHAKESPEARE_GPT_PROGRESS"] = "0"
    reference = () if args.project_only else ("reference",)
    plan = [] if args.warm_only else [("project", "cold", 0)]
    plan += [] if args.warm_only else [(side, "cold", 0) for side in reference]
    sides = ("project", *reference) + (("project-same-recipe",) if args.throughput_steps else ())
    plan += [(side, "warm", r) for r in range(1, args.rounds + 1) for side in sides]
    runs, warm_up_wait = [], None
    for side, cache, rnd in plan:
        # a --warm-only call's runs get names of their own beside the earlier call's
        name = f"{side}-{cache}-{rnd}" + (f"-{os.getpid()}" if args.warm_only else "")
        run = Run(side, cache, rnd, log=str(out / f"{name}.log"))
        artifacts = str(out / "artifacts" / name)  # nothing cached
        measure(run, [a.replace(ARTIFACTS, artifacts) for a in cmds[side]], env, args, flops)
        runs.append(run)
        if run.step_at_target is None:
            reached = f"no estimate at or below {args.target}"
        else:
            reached = (
                f"first estimate at or below {args.target}: {run.val_at_target} at step "
                f"{run.step_at_target}, {run.seconds_to_target} s from process start"
            )
        print(
            f"{side:19} {cache} {rnd}: rc {run.rc}, {reached}; {run.tokens_per_sec} tok/s, "
            f"MFU {run.mfu}",
            flush=True,
        )
        if run.rc != 0:
            print(f"  failed: see {run.log}", flush=True)
        if (side, cache) == ("project", "cold") and (caches / "mlx" / ".warmup").is_dir():
            # warm means the cache holds every kernel: the cold run's warm-up child may
            # still be compiling (it outlives a short run); the next run waits for it here
            warm_up_wait = wait_for_warm_up(caches / "mlx", args.timeout, out / "warm-up-logs")
            done = "did not finish" if warm_up_wait is None else f"{warm_up_wait} s"
            print(f"project's kernel warm-up after its cold run: {done}", flush=True)
    report = {
        "target": args.target,
        "preset": args.preset,
        "reference_preset": args.reference_preset,
        "peak_tflops": args.peak_tflops,
        "flops_per_token": flops,
        "warm_up_wait_seconds": warm_up_wait,
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
        "summary": summary(runs),
        "runs": [asdict(r) for r in runs],
    }
    print(json.dumps(report))
    failed, err = [r.log for r in runs if r.rc != 0], sys.stderr
    if failed:
        print(f"error: {len(failed)} of {len(runs)} runs failed: {', '.join(failed)}", file=err)
        sys.exit(1)


if __name__ == "__main__":
    main()
