"""A GPT-2-shaped character model in pure MLX: no Prefect in here."""

from .runtime.blas import load_fast_blas

load_fast_blas()  # before MLX is loaded, so that MLX binds it

try:
    import mlx.core  # noqa: F401
except ImportError as err:  # on Linux, MLX's library comes from the mlx-cpu or mlx-cuda wheel
    raise ImportError(
        f"MLX cannot load its library ({err}); install this project with its CPU or "
        "GPU extra: pip install -e '.[cpu]' (any machine) or -e '.[cuda]' (NVIDIA GPU)"
    ) from err
