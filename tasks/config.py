"""The configuration types and presets the flows build and pass down to the tasks."""

from mlx_model.config import (
    DEFAULT_PRESET,
    PRESETS,
    DataConfig,
    GPTConfig,
    SampleConfig,
    TrainConfig,
    get_preset,
)

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS",
    "DataConfig",
    "GPTConfig",
    "SampleConfig",
    "TrainConfig",
    "get_preset",
]
