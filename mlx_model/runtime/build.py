"""Build native libraries once and cache them: `~/.cache/shakespeare-gpt/` (or
`$XDG_CACHE_HOME/shakespeare-gpt/`), each under a key of everything that went into it."""

from __future__ import annotations

import os
import platform
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path


def build_cached(path: Path, build: Callable[[Path], Path]) -> Path:
    """path, made by build(a temporary folder next to it) -> the built file, moved in place
    atomically: a concurrent build or import sees the whole file or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        os.replace(build(Path(tmp)), path)
    return path


def run_compilers(
    commands: list[list[str]], timeout: float, error: type[Exception] = RuntimeError
) -> None:
    """Run the compiler commands side by side; `error` says which failed or ran too long."""
    procs = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in commands
    ]
    failures = []
    for command, proc in zip(commands, procs, strict=True):
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise error(f"{command[0]} took more than {timeout:g} s") from None
        if proc.returncode != 0:
            failures.append(f"{command[0]} exited {proc.returncode}: {err.strip()[-400:]}")
    if failures:
        raise error("; ".join(failures))


def cache_dir() -> Path:
    """Where built libraries are cached: $XDG_CACHE_HOME (or ~/.cache)/shakespeare-gpt."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "shakespeare-gpt"


def cpu_features() -> str:
    """The CPU's feature flags (a library built with -march=native is keyed on them)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()
