"""Load an optimised BLAS before MLX on Linux CPUs.

The `mlx[cpu]` wheel links the reference (netlib) BLAS, which makes matrix products
tens of times slower than OpenBLAS. MLX resolves `cblas_sgemm` through the global
symbol scope, so a BLAS loaded with RTLD_GLOBAL before `mlx.core` is imported is the
one it uses. Nothing happens on macOS (Accelerate) or when MLX was already imported.

MLX's CPU backend runs each stream's work on one thread, so the model spreads a
batch over one stream per core ("lanes", see `mlx_model.model`). Each lane then
calls the BLAS itself, so OpenBLAS is set to one thread whenever there is more
than one lane: its own worker threads would only compete with the other lanes and
spin while element-wise work runs.
"""

from __future__ import annotations

import ctypes
import os
import sys
import warnings

CANDIDATES = ("libopenblas.so.0", "libopenblasp-r0.so", "libblis.so.4")
ENV = "SHAKESPEARE_GPT_BLAS"
LANES_ENV = "SHAKESPEARE_GPT_CPU_LANES"

loaded: str | None = None


def load_fast_blas() -> str | None:
    """Load the first BLAS found (env `SHAKESPEARE_GPT_BLAS`, then OpenBLAS); return its name."""
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
    names = [os.environ[ENV]] if os.environ.get(ENV) else list(CANDIDATES)
    for name in names:
        try:
            lib = ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        loaded = name
        if cpu_lanes() > 1 and hasattr(lib, "openblas_set_num_threads"):
            lib.openblas_set_num_threads(1)
        return loaded
    warnings.warn(
        "no optimised BLAS found; MLX on this CPU falls back to the reference BLAS and "
        "trains about 20x slower. Install OpenBLAS (Debian/Ubuntu: "
        "`apt-get install libopenblas0-pthread`) or set SHAKESPEARE_GPT_BLAS to a "
        "libopenblas.so path.",
        RuntimeWarning,
        stacklevel=2,
    )
    return None


def cpu_lanes() -> int:
    """How many CPU streams the model splits a batch over: one per usable core.

    `SHAKESPEARE_GPT_CPU_LANES=N` overrides it (1 turns lanes off).
    """
    value = os.environ.get(LANES_ENV)
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{LANES_ENV} must be a whole number >= 1, got {value!r}")
        return int(value)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)
