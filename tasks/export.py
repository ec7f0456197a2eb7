"""Export the trained model as a Hugging Face Hub folder (weights, tokenizer, model card)."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from mlx_model.checkpoint import load_model
from mlx_model.config import DataConfig, SampleConfig
from mlx_model.data import Vocab
from mlx_model.export import CardFacts, export_hf

from .download import SourceConfig
from .evaluate import RESULT
from .prepare import VOCAB
from .store import META, StageOutput
from .train import best_model


def card_facts(
    trained: StageOutput, evaluation: StageOutput, data: DataConfig, source: SourceConfig
) -> CardFacts:
    """What the model card states: the train stage's own recorded settings (right for a
    sweep's best trial too), the evaluate stage's result and the corpus. A local corpus
    is named by its file name only: the card must not carry this machine's paths."""
    inputs = json.loads((Path(trained.path) / META).read_text())["inputs"]
    local = source.local_path
    return CardFacts(
        name=f"shakespeare-gpt-char-{trained.key[:8]}",
        evaluation=json.loads(evaluation.file(RESULT).read_text()),
        configuration={
            "model": inputs["model"],
            "training": inputs["training"],
            "data": data.to_dict(),
        },
        source=f"a local copy, {local.name}" if local else source.source,
        sha256=source.sha256,
    )


@task(name="export-hf", cache_policy=NO_CACHE)
def export_model(
    trained: StageOutput,
    out_dir: str,
    evaluation: StageOutput | None = None,
    sampling: SampleConfig | None = None,
    data: DataConfig | None = None,
    source: SourceConfig | None = None,
) -> str:
    """Write the Hub folder (GPT2LMHeadModel weights, config, tokenizer, generation config;
    with `evaluation`, the model card) into `out_dir`.

    Raises ValueError naming what prevents it when the model cannot be expressed as GPT-2.
    """
    model = load_model(best_model(trained))
    vocab = Vocab.load(trained.file(VOCAB))
    card = None
    if evaluation is not None:
        card = card_facts(trained, evaluation, data or DataConfig(), source or SourceConfig())
    return str(export_hf(model, Path(out_dir), vocab, sampling, card))
