"""How long does `shakespeare-gpt` take when there is nothing to do?

Times `--help`, a bad flag and a rerun of a finished job (every stage reused), in rounds,
against another checkout of the project in the same rounds (`--against`), and prints each
figure's range over the rounds and the ratio. `--breakdown` profiles one rerun instead
and says where its time went (cProfile adds some 10-30% to each part).

    python bench/cli_startup.py --source input.txt --against ../old-checkout
    python bench/cli_startup.py --source input.txt --breakdown

The job (`--preset`, `--max-iters`) is trained once per checkout first, untimed, in
`--artifacts` (a fresh temporary folder by default). With PREFECT_API_URL set, every
command talks to that server instead of starting a temporary one.
"""

from __future__ import annotations

import argparse
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PARTS = {  # where a rerun's time goes: (label, function as cProfile names it)
    "Prefect imported (the temporary server launched first)": "start_if_needed",
    "the pipeline imported (Prefect's flow engine, MLX, the tasks)": "import_flows",
    "waiting for the temporary server to answer": "wait",
    "the flow run (six cache lookups, artifacts, manifest)": "execute",
}


def command(checkout: Path, args: list[str], profile: str | None = None) -> list[str]:
    python = [sys.executable] + (["-m", "cProfile", "-o", profile] if profile else [])
    return [*python, "-m", "flows", *args]


def timed(checkout: Path, args: list[str], expect: int = 0) -> float:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    start = time.perf_counter()
    proc = subprocess.run(command(checkout, args), cwd=checkout, env=env, capture_output=True)
    seconds = time.perf_counter() - start
    if proc.returncode != expect:
        sys.exit(f"error: {args} exited {proc.returncode}: {proc.stderr.decode()[-2000:]}")
    return seconds


def job(opts: argparse.Namespace, artifacts: Path) -> list[str]:
    return ["run", "--preset", opts.preset, "--max-iters", str(opts.max_iters),
            "--source", opts.source, "--artifacts", str(artifacts)]  # fmt: skip


def breakdown(opts: argparse.Namespace, artifacts: Path) -> None:
    profile = str(artifacts / "rerun.prof")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = command(ROOT, job(opts, artifacts), profile)
    subprocess.run(run, cwd=ROOT, env=env, capture_output=True, check=True)
    stats = pstats.Stats(profile).stats
    total = max(v[3] for v in stats.values())
    print(f"one rerun under cProfile: {total:.2f} s")
    for label, name in PARTS.items():
        cum = max((v[3] for (f, _, n), v in stats.items() if n == name and "flows" in f), default=0)
        print(f"  {cum:6.2f} s  {label}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="the corpus (a local path)")
    parser.add_argument("--preset", default="quick", help="the job's preset (default quick)")
    parser.add_argument("--max-iters", type=int, default=100, help="the job's steps (100)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--against", type=Path, help="another checkout, timed in the same rounds")
    parser.add_argument("--artifacts", type=Path, help="artifact root (default: a temporary one)")
    parser.add_argument("--breakdown", action="store_true", help="profile one rerun instead")
    opts = parser.parse_args()
    opts.source = str(Path(opts.source).resolve())
    artifacts = opts.artifacts or Path(tempfile.mkdtemp(prefix="cli-startup-"))
    checkouts = {"this": ROOT, **({"other": opts.against.resolve()} if opts.against else {})}
    for checkout in checkouts.values():  # train once: the cache keys differ by checkout
        timed(checkout, job(opts, artifacts))
    if opts.breakdown:
        breakdown(opts, artifacts)
        return
    cases = {"--help": (["--help"], 0), "bad flag": (["run", "--bogus"], 2),
             "no-op rerun": (job(opts, artifacts), 0)}  # fmt: skip
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(opts.rounds):
        for case, (args, expect) in cases.items():
            for name, checkout in checkouts.items():
                times.setdefault((case, name), []).append(timed(checkout, args, expect))
    for case in cases:
        line = f"{case:12}"
        for name in checkouts:
            t = times[case, name]
            line += f"  {name} {min(t):.2f}-{max(t):.2f} s"
        if opts.against:
            ratios = [o / t for t, o in zip(times[case, "this"], times[case, "other"], strict=True)]
            line += f"  other/this {min(ratios):.1f}x-{max(ratios):.1f}x"
        print(line)


if __name__ == "__main__":
    main()
