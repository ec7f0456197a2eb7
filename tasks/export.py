"""Export the trained model in Hugging Face's GPT-2 layout."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from mlx_model.checkpoint import load_model
from mlx_model.export import export_hf

from .prepare import VOCAB
from .store import StageOutput
from .train import best_model


@task(name="export-hf", cache_policy=NO_CACHE)
def export_model(trained: StageOutput, out_dir: str) -> str:
    """Write GPT2LMHeadModel safetensors + config.json (and vocab.json) into `out_dir`.

    Raises ValueError naming what prevents it when the model cannot be expressed as GPT-2.
    """
    model = load_model(best_model(trained))
    return str(export_hf(model, Path(out_dir), trained.file(VOCAB)))
