"""A GPT-2-shaped character model in pure MLX: no Prefect in here."""

import os

from .runtime.blas import load_fast_blas

load_fast_blas()  # before MLX is loaded, so that MLX binds it

try:
    import mlx.core  # noqa: F401
except ImportError as err:  # on Linux, MLX's library comes from the mlx-cpu or mlx-cuda wheel
    raise ImportError(
        f"MLX cannot load its library ({err}); install this project with its CPU or "
        "GPU extra: pip install -e '.[cpu]' (any machine) or -e '.[cuda]' (NVIDIA GPU)"
    ) from err

from .runtime.kernel_cache import SHARED_ENV  # noqa: E402

# MLX's CUDA kernels, compiled once and kept between runs; a child of a process that uses
# the cache (a compile warm-up) uses it too
if mlx.core.cuda.is_available() or os.environ.get(SHARED_ENV):
    from .runtime.kernel_cache import install

    try:
        install(mlx.core.__version__)
    except OSError as err:  # a read-only home: MLX's own cache under the temp folder
        import warnings

        warnings.warn(f"MLX's kernel cache stays in the temp folder: {err}", stacklevel=1)
