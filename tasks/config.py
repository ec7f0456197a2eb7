"""A run's configuration: a preset plus overrides, resolved into the dataclasses the tasks take.

Every default lives on a dataclass field (`mlx_model.config`, `tasks.source.SourceConfig`);
the command line and the flow pass only what was given, as overrides by section.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any

from mlx_model.config import (
    DEFAULT_PRESET,
    PRESETS,
    DataConfig,
    GPTConfig,
    ParallelConfig,
    SampleConfig,
    ServeConfig,
    TrainConfig,
    get_preset,
    help_text,
)

from .source import SourceConfig

SECTIONS: dict[str, type] = {
    "source": SourceConfig,
    "model": GPTConfig,
    "training": TrainConfig,
    "data": DataConfig,
    "sampling": SampleConfig,
    "parallel": ParallelConfig,
}
Overrides = dict[str, dict[str, Any]]

__all__ = [
    "DEFAULT_PRESET", "PRESETS", "SECTIONS", "RunConfig", "ServeConfig", "help_text", "parse_value",
]  # fmt: skip


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides what a run computes."""

    preset: str
    source: SourceConfig
    model: GPTConfig
    training: TrainConfig
    data: DataConfig
    sampling: SampleConfig
    parallel: ParallelConfig

    @classmethod
    def resolve(cls, preset: str = DEFAULT_PRESET, overrides: Overrides | None = None) -> RunConfig:
        """The preset's configuration with `overrides` ({section: {field: value}}) applied.

        Raises ValueError naming an unknown preset, section or field, or a bad value.
        """
        chosen = get_preset(preset)
        parts: dict[str, Any] = {
            "source": SourceConfig(),
            "model": chosen.model,
            "training": chosen.train,
            "data": chosen.data,
            "sampling": SampleConfig(),
            "parallel": ParallelConfig(),
        }
        for section, changes in (overrides or {}).items():
            if section not in SECTIONS:
                raise ValueError(
                    f"unknown configuration section {section!r}; choose one of {list(SECTIONS)}"
                )
            if section == "model" and "vocab_size" in changes:
                raise ValueError(
                    "model.vocab_size is set from the corpus's vocabulary; it cannot be "
                    f"overridden (got {changes['vocab_size']!r})"
                )
            fields = {f.name for f in dataclasses.fields(SECTIONS[section])}
            unknown = sorted(set(changes) - fields)
            if unknown:
                raise ValueError(
                    f"unknown {section} field {unknown[0]!r}; choose one of {sorted(fields)}"
                )
            parts[section] = parts[section].replace(**changes)
        return cls(preset, **parts)

    def to_dict(self) -> dict[str, Any]:
        return {"preset": self.preset, **{s: getattr(self, s).to_dict() for s in SECTIONS}}

    @property
    def name(self) -> str:
        """'<preset>-<8 hex digits of the configuration digest>': what ran, at a glance."""
        from .store import digest_json  # the store imports NumPy: not needed for `--help`

        return f"{self.preset}-{digest_json(self.to_dict())[:8]}"


def parse_value(section: str, name: str, text: str) -> Any:
    """`text` as the type of field `name` of `section` ('none' for an optional field)."""
    if section not in SECTIONS:
        raise ValueError(
            f"unknown configuration section {section!r}; choose one of {list(SECTIONS)}"
        )
    hints = typing.get_type_hints(SECTIONS[section])
    if name not in hints:
        raise ValueError(f"unknown {section} field {name!r}; choose one of {sorted(hints)}")
    hint = hints[name]
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if type(None) in options and text.lower() == "none":
        return None
    kind = next(t for t in options if t is not type(None))
    try:
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return text.lower() in ("true", "1")
        return kind(text)
    except ValueError:
        raise ValueError(f"{section}.{name} must be {kind.__name__}, got {text!r}") from None
