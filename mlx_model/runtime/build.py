"""Build native libraries once and cache them: `~/.cache/shakespeare-gpt/` (or
`$XDG_CACHE_HOME/shakespeare-gpt/`), each under a key of everything that went into it."""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType


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


def plan_mlx_extension(
    module: str,
    source: Path,
    flags: Sequence[str],
    link: Sequence[str] = (),
    key: Sequence[str] = (),
    timeout: float = 300,
    error: type[Exception] = RuntimeError,
) -> tuple[Path, Callable[[Path], Path]]:
    """The cached path of a C++ extension of MLX (`source`, whose NB_MODULE is `module`) and
    the function that builds it into a folder; `error` says why it cannot be built here.

    The extension is compiled with the system C++ compiler against the installed MLX's
    headers and nanobind (built alongside, in MLX's nanobind domain, so that it shares
    mlx.core's types), with `flags` for `source`, then linked against libmlx with `link`.
    The cache key holds the source, MLX's version and location, nanobind's version, the
    compiler's version, every flag and `key` (what else the build depends on)."""
    import mlx.core as mx

    try:
        import nanobind
    except ImportError as err:
        raise error(f"{err.name} is not installed") from err
    compiler = next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)
    if compiler is None:
        raise error("no C++ compiler (c++, g++ or clang++) on the PATH")
    python_include = Path(sysconfig.get_paths()["include"])
    if not (python_include / "Python.h").exists():
        raise error(f"no Python headers in {python_include} (install python3-dev)")
    mlx_root = Path(mx.__file__).parent
    if not (mlx_root / "include" / "mlx" / "primitives.h").exists():
        raise error(f"the installed MLX has no C++ headers under {mlx_root / 'include'}")
    nb_src = Path(nanobind.source_dir())
    common = [
        "-fPIC",
        "-fvisibility=hidden",
        "-DNDEBUG",
        "-DNB_COMPACT_ASSERTIONS",
        "-DNB_DOMAIN=mlx",  # share nanobind's type registry with mlx.core
        f"-I{nanobind.include_dir()}",
        f"-I{nb_src.parent / 'ext' / 'robin_map' / 'include'}",
        f"-I{python_include}",
    ]
    ours = [*flags, f"-I{mlx_root / 'include'}"]
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except subprocess.TimeoutExpired as err:
        raise error(f"{compiler} --version did not answer") from err
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    parts = [source.read_text(), mx.__version__, str(mlx_root)]
    parts += [getattr(nanobind, "__version__", ""), suffix, version, *common, *ours, *link, *key]
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]
    lib = cache_dir() / f"{module}-{digest}{suffix}"

    def compile_and_link(tmp: Path) -> Path:
        nb_obj, our_obj, out = tmp / "nb.o", tmp / "ours.o", tmp / "ext.so"
        nanobind_src = str(nb_src / "nb_combined.cpp")
        compile_nb = [compiler, "-O2", "-std=c++17", *common, "-c", nanobind_src, "-o", str(nb_obj)]
        compile_ours = [compiler, *ours, *common, "-c", str(source), "-o", str(our_obj)]
        # the two objects compile side by side, then link against libmlx
        run_compilers([compile_nb, compile_ours], timeout, error)
        libdir = mlx_root / "lib"
        command = [compiler, "-shared", "-o", str(out), str(our_obj), str(nb_obj)]
        command += [f"-L{libdir}", "-lmlx", f"-Wl,-rpath,{libdir}", *link]
        run_compilers([command], timeout, error)
        return out

    return lib, compile_and_link


Plan = Callable[[], tuple[Path, Callable[[Path], Path]]]  # as plan_mlx_extension returns


def built(plan: Plan) -> Path:
    """The cached library that `plan()` names, built first if missing."""
    lib, compile_and_link = plan()
    return lib if lib.exists() else build_cached(lib, compile_and_link)


def unbuilt(plan: Plan, error: type[Exception]) -> bool:
    """Whether `built(plan)` would compile (False where it cannot be built at all)."""
    try:
        return not plan()[0].exists()
    except error:
        return False


def load_extension(
    plan: Plan, import_: Callable[[Path], ModuleType], error: type[Exception], unavailable: str
) -> ModuleType | None:
    """The extension `plan()` names, built if needed and imported with `import_` (which
    raises `error` for a library that does not work: a damaged cached one is rebuilt once,
    unless the error's `rebuild` is False: one that loads but fails its check here);
    None where it cannot be, after one warning: `unavailable` with `{err}` in it."""
    try:
        lib = built(plan)
        try:
            return import_(lib)
        except error as err:
            if not getattr(err, "rebuild", True):
                raise
            lib.unlink(missing_ok=True)  # a damaged cached library (a disk fault, say)
            return import_(built(plan))
    except (error, OSError) as err:  # OSError: an unwritable cache, say
        warnings.warn(unavailable.format(err=err), RuntimeWarning, stacklevel=5)
        return None
