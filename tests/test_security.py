"""No pickle anywhere; names cannot escape the artifact root; the documented server is local."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tasks.manifest import write_manifest
from tasks.store import ArtifactStore, safe_name

ROOT = Path(__file__).resolve().parents[1]
CODE = [p for d in ("mlx_model", "tasks", "flows", "bench") for p in (ROOT / d).rglob("*.py")]


def test_no_pickle_in_the_code():
    pattern = re.compile(
        r"\bimport pickle\b|\bpickle\.|\bcloudpickle\b|allow_pickle\s*=\s*True|torch\.load\("
    )
    offenders = [str(p) for p in CODE if pattern.search(p.read_text())]
    assert len(CODE) > 20 and offenders == []


def test_prefect_results_are_never_pickled():
    # every task opts out of Prefect's result cache (which would pickle return values)
    text = "".join(p.read_text() for p in (ROOT / "tasks").glob("*.py"))
    assert text.count("@task(") == text.count("cache_policy=NO_CACHE") > 5


@pytest.mark.parametrize(
    "name", ["..", ".", "../x", "/abs", "a/b", "a\\b", "a\x00b", "", ".hidden"]
)
def test_names_that_could_escape_the_root_are_refused(name, tmp_path):
    with pytest.raises(ValueError, match="invalid"):
        safe_name(name)
    with pytest.raises(ValueError, match="invalid run name"):
        write_manifest.fn(ArtifactStore(tmp_path), name, {}, [])
    assert list(tmp_path.rglob("*")) == []


def test_documented_server_command_binds_localhost():
    readme = (ROOT / "README.md").read_text()
    commands = [line for line in readme.splitlines() if "prefect server start" in line]
    assert commands and all("--host 127.0.0.1" in line for line in commands)
