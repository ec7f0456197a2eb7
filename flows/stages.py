"""The pipeline's stages by name, and which to recompute: no Prefect here, so the command
line checks `--from`, `--force` and a stage's name before it imports the flow."""

from __future__ import annotations

STAGES = ("download", "vocab", "tokenize", "train", "evaluate", "sample")


def check_stage(name: str, what: str = "stage") -> str:
    if name not in STAGES:
        raise ValueError(f"unknown {what} {name!r}; choose one of {', '.join(STAGES)}")
    return name


def fresh_stages(until: str | None, from_stage: str | None, force: list[str]) -> set[str]:
    """The stages to recompute even when cached: `force` ('all' for every one) plus
    `from_stage` and every stage after it. Raises naming an unknown stage."""
    for name in [n for n in (until, from_stage) if n] + [f for f in force if f != "all"]:
        check_stage(name)
    last = STAGES.index(until) if until else len(STAGES) - 1
    chosen = set(STAGES) if "all" in force else set(force)
    if from_stage:
        first = STAGES.index(from_stage)
        if first > last:
            raise ValueError(f"from_stage {from_stage!r} comes after until {until!r}")
        chosen |= set(STAGES[first : last + 1])
    return chosen
