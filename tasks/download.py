"""Download the corpus, verify its SHA-256, keep it as an artifact."""

from __future__ import annotations

import hashlib
import socket
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from mlx_model.files import atomic_path

from .progress import terminal_bar
from .source import CANONICAL_URL, TINY_SHAKESPEARE_SHA256, SourceConfig  # noqa: F401
from .store import ArtifactStore, StageOutput, code_version, finished

CORPUS = "input.txt"
CHUNK = 1 << 16


class ChecksumError(ValueError):
    """The payload's SHA-256 is not the expected one."""


class UnreachableError(OSError):
    """The source's host has no address here (no network, or a wrong name): not retried."""


class TransientDownloadError(OSError):
    """A network failure worth retrying (refused, reset, 5xx, truncated body)."""


def _open(source: str, timeout: float):
    """A readable stream for an http(s) URL, a file:// URL or a local path, and its length."""
    scheme = urllib.parse.urlsplit(source).scheme.lower()
    if scheme in ("http", "https", "file"):
        try:
            response = urllib.request.urlopen(source, timeout=timeout)  # noqa: S310 (scheme checked)
        except urllib.error.HTTPError as err:
            if err.code >= 500 or err.code == 429:
                raise TransientDownloadError(f"{source}: HTTP {err.code}") from None
            raise FileNotFoundError(f"{source}: HTTP {err.code} {err.reason}") from None
        except urllib.error.URLError as err:
            if scheme == "file":
                raise FileNotFoundError(f"{source}: {err.reason}") from None
            if isinstance(err.reason, socket.gaierror):  # no DNS answer: retrying will not help
                raise UnreachableError(f"{source} is unreachable: {err.reason}") from None
            raise TransientDownloadError(f"{source} is unreachable: {err.reason}") from None
        length = response.headers.get("Content-Length")
        return response, int(length) if length else None
    if len(scheme) <= 1:  # no scheme, or a Windows drive letter: a local path
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"corpus source {source!r} is not a file")
        return open(path, "rb"), path.stat().st_size
    raise ValueError(f"unsupported source scheme {scheme!r} in {source!r}: use http, https or file")


def fetch(
    source: str,
    dest: Path,
    sha256: str,
    max_bytes: int = SourceConfig.max_bytes,
    timeout: float = 30.0,
    on_progress: Callable[[int, int | None], None] | None = None,
) -> int:
    """Stream `source` into `dest`, verifying SHA-256 and size; `dest` appears only if valid.

    Returns the number of bytes. Raises ChecksumError (digests named), ValueError for
    an oversize payload, TransientDownloadError for failures worth retrying.
    """
    stream, length = _open(source, timeout)
    if length is not None and length > max_bytes:
        stream.close()
        raise ValueError(f"{source} is {length} bytes, over the {max_bytes}-byte limit")
    h, size = hashlib.sha256(), 0
    with stream, atomic_path(dest) as tmp, open(tmp, "wb") as out:
        try:
            while block := stream.read(CHUNK):
                size += len(block)
                if size > max_bytes:
                    raise ValueError(f"{source} is over the {max_bytes}-byte limit")
                h.update(block)
                out.write(block)
                if on_progress:
                    on_progress(size, length)
        except (ConnectionError, TimeoutError, urllib.error.URLError) as err:
            raise TransientDownloadError(f"{source}: connection lost: {err}") from None
        if length is not None and size != length:
            raise TransientDownloadError(f"{source}: body truncated at {size} of {length} bytes")
        if h.hexdigest() != sha256:
            raise ChecksumError(
                f"checksum mismatch for {source}: expected sha256 {sha256}, got {h.hexdigest()}"
                " (a corpus of your own: pass --sha256 with the digest it got)"
            )
        out.flush()
    return size


def _mb(done: int, total: int | None) -> str:
    return f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"


def _retry_transient(task, task_run, state) -> bool:
    return isinstance(state.data, TransientDownloadError | ConnectionError | TimeoutError)


@task(
    name="download",
    retries=3,
    retry_delay_seconds=[1, 2, 4],
    retry_condition_fn=_retry_transient,
    cache_policy=NO_CACHE,
)
def download_corpus(store: ArtifactStore, corpus: SourceConfig, force: bool = False) -> StageOutput:
    """Fetch the corpus and verify its SHA-256; cached on (source, digest)."""
    key = {"source": corpus.source, "sha256": corpus.sha256, "code": code_version(__name__)}

    def compute(directory: Path) -> dict:
        with terminal_bar("download", "download", None) as bar:
            progress = (
                (lambda done, total: bar(completed=done, total=total, figures=_mb(done, total)))
                if bar
                else None
            )
            size = fetch(
                corpus.source,
                directory / CORPUS,
                corpus.sha256,
                corpus.max_bytes,
                on_progress=progress,
            )
        return {"bytes": size, "source": corpus.source}

    return finished(store.run("download", key, compute, [CORPUS], force))
