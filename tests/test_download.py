from __future__ import annotations

import pytest

from tasks.download import (
    ChecksumError,
    SourceConfig,
    TransientDownloadError,
    download_corpus,
    fetch,
)
from tasks.store import ArtifactStore


def test_fetch_over_http(http_server, corpus_sha, tmp_path):
    url, handler = http_server
    size = fetch(url, tmp_path / "c.txt", corpus_sha)
    assert size == 1_115_394
    assert (tmp_path / "c.txt").stat().st_size == size


def test_corrupted_payload_fails_and_leaves_nothing(http_server, corpus_sha, tmp_path):
    url, handler = http_server
    handler.plan = ["corrupt"]
    with pytest.raises(ChecksumError, match=f"expected sha256 {corpus_sha}, got [0-9a-f]{{64}}"):
        fetch(url, tmp_path / "c.txt", corpus_sha)
    assert list(tmp_path.iterdir()) == []


def test_wrong_expected_checksum(corpus_path, tmp_path):
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        fetch(corpus_path.as_uri(), tmp_path / "c.txt", "0" * 64)
    assert list(tmp_path.iterdir()) == []


def test_truncated_body_is_transient(http_server, corpus_sha, tmp_path):
    url, handler = http_server
    handler.plan = ["truncate"]
    with pytest.raises(TransientDownloadError):
        fetch(url, tmp_path / "c.txt", corpus_sha)
    assert list(tmp_path.iterdir()) == []


def test_unreachable_source(tmp_path, corpus_sha):
    with pytest.raises(TransientDownloadError, match="127.0.0.1:9/x.txt is unreachable"):
        fetch("http://127.0.0.1:9/x.txt", tmp_path / "c.txt", corpus_sha, timeout=2)


def test_missing_local_path(tmp_path, corpus_sha):
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        fetch(str(tmp_path / "nope.txt"), tmp_path / "c.txt", corpus_sha)


def test_bad_scheme(tmp_path, corpus_sha):
    with pytest.raises(ValueError, match="unsupported source scheme 'ftp'"):
        fetch("ftp://example.org/input.txt", tmp_path / "c.txt", corpus_sha)


def test_oversize_download_is_refused(corpus_path, corpus_sha, tmp_path):
    with pytest.raises(ValueError, match="over the 1000-byte limit"):
        fetch(str(corpus_path), tmp_path / "c.txt", corpus_sha, max_bytes=1000)


def test_download_task_plain_path_and_file_url(corpus_path, corpus_sha, tmp_path):
    store = ArtifactStore(tmp_path)
    a = download_corpus.fn(store, SourceConfig(str(corpus_path), corpus_sha))
    b = download_corpus.fn(store, SourceConfig(corpus_path.as_uri(), corpus_sha))
    assert a.file("input.txt").read_bytes() == corpus_path.read_bytes()
    assert b.digest("input.txt") == corpus_sha
    assert not a.cached and not b.cached  # different sources, different keys
    assert download_corpus.fn(store, SourceConfig(str(corpus_path), corpus_sha)).cached


def test_download_task_retries_a_500_then_succeeds(
    http_server, corpus_sha, tmp_path, prefect_harness
):
    url, handler = http_server
    handler.plan = ["500", "500"]
    out = download_corpus.with_options(retry_delay_seconds=0)(
        ArtifactStore(tmp_path), SourceConfig(url, corpus_sha)
    )
    assert out.digest("input.txt") == corpus_sha
    assert handler.requests == 3


def test_download_task_does_not_retry_a_checksum_error(
    http_server, corpus_sha, tmp_path, prefect_harness
):
    url, handler = http_server
    handler.plan = ["corrupt"]
    task = download_corpus.with_options(retry_delay_seconds=0)
    with pytest.raises(ChecksumError):
        task(ArtifactStore(tmp_path), SourceConfig(url, corpus_sha))
    assert handler.requests == 1
