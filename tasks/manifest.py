"""The run manifest: what a flow run used and produced, written last."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from mlx_model.files import write_text_atomic

from .store import ArtifactStore, StageOutput, safe_name


def manifest_path(root: Path, run_name: str) -> Path:
    """Where the manifest of run `run_name` is written under the artifact root."""
    return Path(root) / "runs" / safe_name(run_name, "run name") / "manifest.json"


@task(name="manifest", cache_policy=NO_CACHE)
def write_manifest(
    store: ArtifactStore,
    run_name: str,
    params: dict[str, Any],
    outputs: list[StageOutput],
) -> str:
    """Record the run's parameters and each stage's cache key, folder and hit/miss."""
    path = manifest_path(store.root, run_name)
    manifest = {
        "run": run_name,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "params": params,
        "stages": {o.stage: o.to_dict() for o in outputs},
    }
    write_text_atomic(path, json.dumps(manifest, indent=2, default=str))
    return str(path)
