"""Validation loss of the trained model over the whole validation split."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from mlx_model import ops
from mlx_model.checkpoint import load_model
from mlx_model.data import read_tokens
from mlx_model.evaluate import evaluate
from mlx_model.files import write_text_atomic

from .prepare import VAL
from .progress import terminal_bar
from .store import ArtifactStore, StageOutput, code_version, finished
from .train import WEIGHTS, best_model

RESULT = "eval.json"


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_model(
    store: ArtifactStore, model: StageOutput, tokens: StageOutput, force: bool = False
) -> StageOutput:
    """Compute loss, perplexity and bits per character on the validation split."""
    key = {
        "weights": model.digest(WEIGHTS),
        "val": tokens.digest(VAL),
        "code": code_version(__name__),
        "ops": ops.signature("float32", training=False),
    }

    def compute(directory: Path) -> dict:
        with terminal_bar("evaluate", "evaluate", None) as bar:
            gpt = load_model(best_model(model))
            val_ids, _ = read_tokens(tokens.file(VAL))
            result = evaluate(gpt, val_ids)
            if bar:
                bar(figures=f"val_loss {result['val_loss']:.4f}  ({result['tokens']} tokens)")
        write_text_atomic(directory / RESULT, json.dumps(result, indent=2))
        return result

    return finished(store.run("evaluate", key, compute, [RESULT], force))
