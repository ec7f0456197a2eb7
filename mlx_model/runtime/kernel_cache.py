"""MLX's CUDA kernel cache, kept under the user's cache folder and shared safely by processes.

MLX compiles each fused kernel module (`mx.compile`) and some indexing kernels with NVRTC
at first use and keeps the result in `MLX_PTX_CACHE_DIR`, by default `mlx/<version>/ptx`
under the system temp folder, which a reboot or a new container loses
(`mlx/backend/cuda/jit_module.cpp`, MLX 0.32). MLX writes each module's files in place
(`<module>.ptx`, then `.txt` with the kernel names, then `.cu`), so a process reading a
module another process is still writing can load a torn file.

So each process gets a private folder of its own (`.staging/<host>-<pid>-<random>/`),
seeded with copies of every complete module of the shared cache, and MLX reads and
writes only there. `publish()` moves the modules this process compiled into the shared
folder atomically (companion files first, the `.ptx` last, each by rename), so a module
is in the shared cache whole or not at all; it runs at the training loop's sync points
and at exit. The shared folder is `~/.cache/shakespeare-gpt/mlx-kernels/<mlx version>/`
(`$XDG_CACHE_HOME` respected), or the user's own `MLX_PTX_CACHE_DIR`, shared the same way.

Nothing happens without CUDA: on the CPU, MLX compiles no NVRTC modules.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..files import locked
from .build import cache_dir

ENV = "MLX_PTX_CACHE_DIR"
# set by `install` for child processes (warm-up, data-parallel ranks, sweep workers): they
# inherit MLX_PTX_CACHE_DIR pointing at the parent's private folder, and must take a
# private folder of their own over the same shared one instead
SHARED_ENV = "SHAKESPEARE_GPT_KERNEL_CACHE"
STAGING = ".staging"
WARM = ".warm"  # one empty file per compiled-step signature whose kernels are all cached
MODULE_SUFFIX = ".ptx"
COMPANIONS = (".txt", ".cu")


@dataclass
class KernelCache:
    """The shared cache folder and this process's private folder (where MLX reads/writes)."""

    shared: Path
    private: Path
    modules_at_start: int

    @property
    def cold(self) -> bool:
        return self.modules_at_start == 0

    def describe(self) -> str:
        state = "cold: kernels compile at first use" if self.cold else "warm"
        return f"{self.shared} ({self.modules_at_start} modules, {state})"

    def refresh(self) -> int:
        """Copy in the modules other processes published since this one started; returns
        how many."""
        return _copy_modules(self.shared, self.private)

    def publish(self) -> int:
        """Move modules compiled here into the shared cache (atomically); returns how many.
        Call it where no kernel is being compiled (after an `mx.eval`)."""
        return _copy_modules(self.private, self.shared)

    def is_warm(self, signature: dict[str, Any]) -> bool:
        """Whether a process recorded that the kernels of `signature` are all cached."""
        return (self.shared / WARM / _digest(signature)).exists()

    def mark_warm(self, signature: dict[str, Any]) -> None:
        """Record (after `publish`) that the kernels of `signature` are all in the cache."""
        folder = self.shared / WARM
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / _digest(signature)
        if not path.exists():
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
            with os.fdopen(fd, "w") as f:
                json.dump(signature, f, sort_keys=True)
            os.replace(tmp, path)

    @contextlib.contextmanager
    def lock(self, signature: dict[str, Any]) -> Iterator[None]:
        """Hold the shared cache's lock for `signature` (one warm-up compiles it at a time)."""
        with locked(self.shared / WARM / f"{_digest(signature)}.lock"):
            yield

    def close(self) -> None:
        """Publish, then remove the private folder."""
        with contextlib.suppress(OSError):
            self.publish()
        shutil.rmtree(self.private, ignore_errors=True)


def default_shared(version: str) -> Path:
    return cache_dir() / "mlx-kernels" / version


def _digest(signature: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:32]


def _modules(folder: Path) -> list[Path]:
    """Relative paths of the complete modules (`.ptx` files) under `folder`, staging and
    bookkeeping folders left out."""
    found = []
    # os.walk, not rglob: other processes' private folders under .staging come and go
    # (rglob raised when one vanished mid-walk); they are pruned here, never entered
    for top, dirs, files in os.walk(folder):
        if Path(top) == folder:
            dirs[:] = [d for d in dirs if d not in (STAGING, WARM)]
        for name in files:
            if name.endswith(MODULE_SUFFIX) and not name.startswith(".tmp-"):
                found.append(Path(top, name).relative_to(folder))
    return found


def count_modules(folder: Path) -> int:
    return len(_modules(folder))


def _place(source: Path, target: Path) -> None:
    """`target` becomes a copy of `source` by one rename: readers see all of it or none.
    A copy, not a hard link: MLX rewrites a module's files in place when it recompiles
    one (a module whose read failed), which through a link would tear the other copy."""
    target.parent.mkdir(parents=True, exist_ok=True)
    # not named after the module: MLX's names run up to the file system's limit (a fused
    # kernel's ops spelt out), and a prefix on one pushed it over (ENAMETOOLONG)
    tmp = target.parent / f".tmp-{os.getpid()}-{os.urandom(8).hex()}"
    shutil.copy2(source, tmp)  # with its time: when the module was compiled
    os.replace(tmp, target)


def _copy_modules(source: Path, target: Path) -> int:
    """Every module in `source` missing from `target`, its companions before its `.ptx`."""
    moved = 0
    for rel in _modules(source):
        if (target / rel).exists():
            continue
        for suffix in COMPANIONS:
            companion = source / rel.with_suffix(suffix)
            if companion.exists():
                _place(companion, target / rel.with_suffix(suffix))
        _place(source / rel, target / rel)
        moved += 1
    return moved


def _remove_stale_staging(staging: Path) -> None:
    """Private folders left by processes of this host that no longer run (a killed run)."""
    host = socket.gethostname()
    for folder in staging.glob(f"{host}-*-*"):
        pid = folder.name[len(host) + 1 :].split("-")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:  # alive, another user's
            pass


_ACTIVE: KernelCache | None = None


def install(version: str, environ: dict[str, str] | None = None) -> KernelCache:
    """Point MLX at the shared cache (through a private folder) for this process.

    Must run before MLX compiles its first kernel (MLX reads `MLX_PTX_CACHE_DIR` once).
    Idempotent within a process. Raises OSError if the cache folder cannot be created.
    """
    global _ACTIVE
    env = os.environ if environ is None else environ
    if _ACTIVE is not None:
        return _ACTIVE
    own, inherited = env.get(ENV), env.get(SHARED_ENV)
    if inherited and own and Path(own).parent == Path(inherited) / STAGING:
        shared = Path(inherited)  # a child of a process that installed the cache
    else:
        shared = Path(own) if own else default_shared(version)
    staging = shared / STAGING
    staging.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(staging)
    private = Path(tempfile.mkdtemp(dir=staging, prefix=f"{socket.gethostname()}-{os.getpid()}-"))
    cache = KernelCache(shared, private, 0)
    cache.modules_at_start = _copy_modules(shared, private)
    env[ENV] = str(private)
    env[SHARED_ENV] = str(shared)
    atexit.register(cache.close)
    _ACTIVE = cache
    return cache


def active() -> KernelCache | None:
    """The process's kernel cache, if `install` ran (a CUDA process)."""
    return _ACTIVE
