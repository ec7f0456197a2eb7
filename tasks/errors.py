"""One line for the operating system's refusals a user can meet and act on: a full disk,
a folder that cannot be written, too many open files."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

# what the user can fix; any other OSError is a bug or a fault of its own (a network
# error has its own line) and keeps its traceback
ACTIONABLE = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space or raise the quota",
    errno.EFBIG: "raise the file size limit (ulimit -f)",
    errno.EACCES: "check its permissions",
    errno.EPERM: "check its permissions",
    errno.EROFS: "use a writable --artifacts or --out folder",
    errno.EMFILE: "raise the open-file limit (ulimit -n)",
    errno.ENFILE: "close other programs' files",
}


def free_bytes(path: str | Path) -> int | None:
    """Free bytes on the filesystem of `path` (or of its nearest existing parent)."""
    for folder in [Path(path), *Path(path).parents]:
        if folder.exists():
            try:
                return shutil.disk_usage(folder).free
            except OSError:
                return None
    return None


def _size(n: int) -> str:
    for unit in ("bytes", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return ""  # unreachable


def describe_os_error(err: OSError) -> str | None:
    """'stage 'train': PATH: No space left on device (1.2 MB free there); free some space
    and rerun the same command ...', or None for an error the user cannot act on.
    `err.stage` (set by the artifact store) names the stage, if one was running."""
    if err.errno not in ACTIONABLE:
        return None
    stage = getattr(err, "stage", None)
    where = f"stage {stage!r} stopped: " if stage else ""
    path = f"{err.filename}: " if err.filename else ""
    free = ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT) and err.filename:
        left = free_bytes(err.filename)
        free = f" ({_size(left)} free there)" if left is not None else ""
    return (
        f"{where}{path}{err.strerror}{free}; {ACTIONABLE[err.errno]} and rerun the same "
        "command (finished stages are kept and reused)"
    )
