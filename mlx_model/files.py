"""Atomic file writes (write to a temporary name in the same folder, then rename), and an
exclusive lock file."""

from __future__ import annotations

import contextlib
import fcntl
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

_UMASK = os.umask(0o022)  # read once, at import (reading it means setting it)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: os.PathLike | str) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success fsync and rename it into place.

    The temporary name keeps the suffix so writers that insist on one still work.
    On failure the temporary file is removed and `path` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:8]}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        # as a plain open() would make it: some writers (safetensors) create 0600 files
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except OSError as err:
        if err.filename in (None, str(tmp)):  # a failed write() names no file: name the one meant
            err.filename = str(path)
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text_atomic(path: os.PathLike | str, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def locked(path: os.PathLike | str) -> Iterator[None]:
    """Hold an exclusive advisory lock (flock) on the file `path`, created with its folder
    if missing; other processes that ask for it wait."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
