"""CPU lanes: a batch split over one MLX stream per core.

MLX's CPU backend runs a stream's work on one thread, so one stream uses one core.
Splitting the batch over one stream per core ("lanes", `mlx_model.ops.loss`) is
what puts every core of a small machine to work. The lane count is an execution
setting, like a thread count; results are reproducible for a given count. This module
imports no MLX: the BLAS preload asks it for the count before MLX is loaded.
"""

from __future__ import annotations

import os

ENV = "SHAKESPEARE_GPT_CPU_LANES"


def cpu_lanes() -> int:
    """How many CPU streams the model splits a batch over: one per usable core.

    `SHAKESPEARE_GPT_CPU_LANES=N` overrides it (1 turns lanes off).
    """
    value = os.environ.get(ENV)
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ValueError(f"{ENV} must be a whole number >= 1, got {value!r}")
        return int(value)
    return usable_cores()


def usable_cores() -> int:
    """The cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS
        return max(1, os.cpu_count() or 1)
