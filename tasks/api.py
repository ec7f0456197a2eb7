"""The trained model behind `shakespeare-gpt api`: which one a reference names, and serving it."""

from __future__ import annotations

import json
import socket
from pathlib import Path

from mlx_model.config import SampleConfig, ServeConfig

from .manifest import manifest_path
from .prepare import VOCAB
from .store import ArtifactStore, StageOutput
from .sweep import BEST_OF, best_trial
from .train import best_model


def trained_model(root: Path, reference: str) -> StageOutput:
    """The train stage output `reference` names, verified by digest: `best-of:<sweep>` (a
    sweep's best trial) or a run name (the model that run trained or reused).

    Raises ValueError naming the reference when there is no such run or sweep, the run
    stopped before training, or the model's files are missing or damaged.
    """
    if reference.startswith(BEST_OF):
        return best_trial(root, reference)
    path = manifest_path(root, reference)
    if not path.exists():
        raise ValueError(
            f"no run named {reference!r} under {root} (looked for {path}); "
            f"--model takes a run name or {BEST_OF}<sweep>"
        )
    stages = json.loads(path.read_text())["stages"]
    if "train" not in stages:
        raise ValueError(f"run {reference!r} has no trained model (it stopped before train)")
    hit = ArtifactStore(root).lookup("train", stages["train"]["key"])
    if hit is None:
        raise ValueError(f"the model of run {reference!r} is missing or damaged")
    return hit


def check_address(config: ServeConfig) -> None:
    """Raise ValueError naming host and port when the server could not listen there (the
    port taken, an address this machine does not have), before any model is loaded."""
    try:
        with socket.create_server((config.host, config.port)):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        raise ValueError(f"cannot listen on {config.host}:{config.port}: {reason}") from None


def serve_model(
    trained: StageOutput,
    model_id: str,
    defaults: SampleConfig,
    config: ServeConfig,
    verbose: bool = False,
) -> None:
    """Serve the trained model over HTTP until interrupted (see mlx_model.server)."""
    from mlx_model.server import serve  # FastAPI and uvicorn load only for this command

    serve(best_model(trained), trained.file(VOCAB), model_id, defaults, config, verbose)
