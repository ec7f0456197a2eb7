"""Where the corpus comes from: a configuration with no Prefect in it (the command line
reads its help texts before any heavy import)."""

from __future__ import annotations

import re
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from mlx_model.config import Serializable, option

CANONICAL_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


@dataclass(frozen=True)
class SourceConfig(Serializable):
    """Where the corpus comes from and what it must be."""

    source: str = option(CANONICAL_URL, "corpus URL (http, https, file) or local path")
    sha256: str = option(TINY_SHAKESPEARE_SHA256, "expected SHA-256 of the corpus")
    max_bytes: int = option(64 * 1024 * 1024, "refuse a larger download (bytes)")

    def __post_init__(self) -> None:
        if not isinstance(self.sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"sha256 must be 64 lowercase hex digits, got {self.sha256!r}")
        if not isinstance(self.max_bytes, int) or self.max_bytes <= 0:
            raise ValueError(f"max_bytes must be a positive integer, got {self.max_bytes!r}")
        scheme = urllib.parse.urlsplit(self.source).scheme.lower()
        if len(scheme) > 1 and scheme not in ("http", "https", "file"):
            raise ValueError(
                f"unsupported source scheme {scheme!r} in {self.source!r}: use http, https or file"
            )

    @property
    def local_path(self) -> Path | None:
        """The file a file:// URL or a plain path names (None for http and https)."""
        parts = urllib.parse.urlsplit(self.source)
        if parts.scheme.lower() == "file":
            return Path(urllib.request.url2pathname(parts.path))
        return Path(self.source) if len(parts.scheme) <= 1 else None
