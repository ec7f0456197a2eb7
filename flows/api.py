"""`shakespeare-gpt api`: pick the trained model, then serve it over HTTP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tasks.api import check_address, serve_model, trained_model
from tasks.config import RunConfig, ServeConfig
from tasks.store import default_root

from .pipeline import pipeline


def api(params: dict[str, Any], serve: dict[str, Any] | None = None, verbose: bool = False) -> int:
    """Serve the model `params["model"]` names (a run or `best-of:<sweep>`), or else the
    one the pipeline trains for `params` (cached stages reused, trained if needed).

    `serve` holds the ServeConfig fields that were given. Raises ValueError naming a
    bad setting or an unknown model before anything is loaded or trained.
    """
    config = ServeConfig(**(serve or {}))
    sampling = RunConfig.resolve(params["preset"], params["overrides"]).sampling
    config.check(sampling)
    check_address(config)
    if params.get("model"):
        root = Path(params["artifacts"]) if params["artifacts"] else default_root()
        trained, model_id = trained_model(root, params["model"]), params["model"]
    else:
        keys = ("preset", "overrides", "artifacts", "from_stage", "force")
        summary = pipeline(**{k: params[k] for k in keys}, until="train")
        trained = summary["outputs"]["train"]
        model_id = summary["run"]  # this run's name, which --model takes
    serve_model(trained, model_id, sampling, config, verbose)
    return 0
