"""Load an optimised BLAS before MLX on Linux CPUs.

The `mlx[cpu]` wheel links the reference (netlib) BLAS, which makes matrix products
tens of times slower than OpenBLAS. MLX resolves `cblas_sgemm` and the LAPACK routines
through the global symbol scope, so a library loaded with RTLD_GLOBAL before
`mlx.core` is imported, exporting those names, is the one MLX uses.

The project depends on `scipy-openblas32` on Linux: the OpenBLAS build that NumPy and
SciPy ship, one self-contained library that picks its kernels for the CPU it runs on.
It prefixes its symbols (`scipy_cblas_sgemm`), so the first import builds a small
shim of jump instructions (`cblas_sgemm: jmp scipy_cblas_sgemm`) with the system C
compiler, which MLX's own CPU compiler needs too, and caches it. Without a compiler,
a system OpenBLAS (Debian's `libopenblas0-pthread`) is the fallback; without either,
a warning says so and MLX runs on its reference BLAS. `SHAKESPEARE_GPT_BLAS` names a
library to load instead, or `off`. Nothing happens on macOS (Accelerate) or when MLX
was already imported.

MLX's CPU backend runs each stream's work on one thread, so the model spreads a batch
over one stream per core (`mlx_model.runtime.lanes`). Each lane then calls the
BLAS itself, so OpenBLAS is set to one thread whenever there is more than one lane:
its own worker threads would only compete with the other lanes and spin while
element-wise work runs.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

from .build import build_cached, cache_dir, run_compilers
from .lanes import cpu_lanes

SYSTEM_CANDIDATES = ("libopenblas.so.0", "libopenblasp-r0.so")
ENV = "SHAKESPEARE_GPT_BLAS"
# What libmlx (0.32) takes from a BLAS/LAPACK: `nm -D --undefined-only libmlx.so`.
MLX_SYMBOLS = (
    "cblas_sgemm cblas_dgemm cblas_cgemm "
    "sgeev_ dgeev_ cgeev_ sgesdd_ dgesdd_ cgesdd_ ssyevd_ dsyevd_ cheevd_ "
    "sgeqrf_ dgeqrf_ sorgqr_ dorgqr_ sgetrf_ dgetrf_ sgetri_ dgetri_ "
    "spotrf_ dpotrf_ strtri_ dtrtri_"
).split()
_JUMP = {"x86_64": "jmp {target}@PLT", "aarch64": "b {target}"}

loaded: str | None = None


def load_fast_blas() -> str | None:
    """Load the optimised BLAS (see the module docstring); return what was loaded."""
    global loaded
    if loaded or not sys.platform.startswith("linux") or os.environ.get(ENV) == "off":
        return loaded
    if "mlx.core" in sys.modules:
        warnings.warn(
            "mlx.core was imported before mlx_model, so MLX already bound the reference "
            "BLAS; import mlx_model first to get the fast CPU path.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    problems: list[str] = []
    if os.environ.get(ENV):
        attempts = [lambda: _load_system(os.environ[ENV])]
    else:
        attempts = [_load_scipy_openblas, *(lambda n=n: _load_system(n) for n in SYSTEM_CANDIDATES)]
    for attempt in attempts:
        try:
            loaded, lib = attempt()
        except (OSError, RuntimeError) as err:
            problems.append(str(err))
            continue
        if cpu_lanes() > 1:
            for name in ("scipy_openblas_set_num_threads", "openblas_set_num_threads"):
                if hasattr(lib, name):
                    getattr(lib, name)(1)
                    break
        return loaded
    warnings.warn(
        "no optimised BLAS could be loaded, so MLX on this CPU uses the reference BLAS "
        "and trains much slower (" + "; ".join(problems) + "). Reinstall the project "
        "(it depends on scipy-openblas32) with a C compiler on the PATH, install OpenBLAS "
        "(Debian/Ubuntu: `apt-get install libopenblas0-pthread`), or set "
        f"{ENV} to a libopenblas.so path.",
        RuntimeWarning,
        stacklevel=2,
    )
    return None


def _load_system(name: str) -> tuple[str, ctypes.CDLL]:
    return name, ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)


def _load_scipy_openblas() -> tuple[str, ctypes.CDLL]:
    try:
        import scipy_openblas32
    except ImportError as err:
        raise RuntimeError("scipy-openblas32 is not installed") from err
    path = Path(scipy_openblas32.get_lib_dir()) / scipy_openblas32.get_library(fullname=True)
    lib = ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    ctypes.CDLL(str(_shim(path)), mode=ctypes.RTLD_GLOBAL)
    return str(path), lib


def _shim(target: Path) -> Path:
    """The cached shim library whose MLX_SYMBOLS jump to `scipy_<symbol>`; built if missing."""
    machine = platform.machine()
    if machine not in _JUMP:
        raise RuntimeError(f"no BLAS shim for the {machine} architecture")
    source = "".join(
        f'__asm__(".text\\n.globl {s}\\n.type {s}, @function\\n{s}:\\n\\t'
        + _JUMP[machine].format(target="scipy_" + s)
        + f'\\n.size {s}, .-{s}\\n");\n'
        for s in MLX_SYMBOLS
    )
    stat = target.stat()
    key = hashlib.sha256(f"{source}{target}{stat.st_size}{stat.st_mtime_ns}".encode()).hexdigest()
    shim = cache_dir() / f"libblas-shim-{key[:16]}.so"
    if shim.exists():
        return shim
    compiler = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if compiler is None:
        raise RuntimeError("no C compiler (cc, gcc or clang) to build the scipy-openblas32 shim")

    def build(tmp: Path) -> Path:
        src, out = tmp / "shim.c", tmp / "shim.so"
        src.write_text(source)
        run_compilers([[compiler, "-shared", "-fPIC", "-o", str(out), str(src)]], timeout=120)
        return out

    return build_cached(shim, build)
