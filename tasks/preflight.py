"""Checks that need only a run's parameters, made before any stage starts."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from mlx_model import ops

from .config import RunConfig
from .store import default_root


def check_run(config: RunConfig, artifacts: str | None) -> None:
    """Raise ValueError naming what would make the run fail: a batch that does not split
    over the training processes, a local corpus that is not a file, an artifact root that
    is not a folder or cannot be created, or a bad setting of the ops in the environment
    (`SHAKESPEARE_GPT_OPS`, `_CPU_LANES`, `_ATTENTION`)."""
    ops.check_settings()
    world = config.parallel.world_size
    if config.training.batch_size % world:
        raise ValueError(
            f"batch_size {config.training.batch_size} does not split over {world} processes evenly"
        )
    local = config.source.local_path
    if local is not None and not local.is_file():
        raise ValueError(f"corpus source {config.source.source!r} is not a file")
    if artifacts is not None and not artifacts.strip():  # Path("") is the current folder
        raise ValueError(f"artifact root must name a folder, got {artifacts!r}")
    check_writable_folder(Path(artifacts) if artifacts else default_root(), "artifact root")


def check_export_target(out: str) -> None:
    """Raise ValueError if `out` cannot become the export folder: not writable, or holding
    files the export would overwrite (a README.md, a config.json) that are not an earlier
    export's. Other files, hidden ones (a Hub clone's .git) and an earlier export are fine."""
    if not out.strip():
        raise ValueError(f"export target must name a folder, got {out!r}")
    path = Path(out)
    check_writable_folder(path, "export target")
    if not path.is_dir():
        return
    from mlx_model.export import EXPORT_FILES, is_export

    clash = [name for name in EXPORT_FILES if (path / name).exists()]
    if clash and not is_export(path):
        raise ValueError(
            f"export target {out!r} already holds {', '.join(clash)}, not from an earlier "
            "export: the export would overwrite them; pass a new or empty folder"
        )


def check_writable_folder(path: Path, what: str) -> None:
    """`path` is a writable folder or can be created as one. A folder that had to be
    created to find out is removed again: a rejected run leaves nothing behind."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {str(path)!r} exists and is not a folder")
    missing = [p for p in [path.absolute(), *path.absolute().parents] if not p.exists()]
    try:
        for attempt in range(3):
            path.mkdir(parents=True, exist_ok=True)
            try:
                os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=path))
                break
            except FileNotFoundError:
                # another run started at the same moment created the folder to probe it
                # too, and removed it again: create it once more
                if attempt == 2:
                    raise
    except OSError as err:
        raise ValueError(f"{what} {str(path)!r} cannot be written: {err.strerror}") from None
    finally:
        for folder in missing:  # deepest first
            with contextlib.suppress(OSError):
                folder.rmdir()
