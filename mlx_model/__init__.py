"""A GPT-2-shaped character model in pure MLX: no Prefect in here."""

from .runtime.blas import load_fast_blas

load_fast_blas()
