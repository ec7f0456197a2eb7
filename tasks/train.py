"""Train the GPT on the token files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from mlx_model import checkpoint, ops
from mlx_model.config import GPTConfig, TrainConfig
from mlx_model.data import Vocab, read_tokens
from mlx_model.files import write_text_atomic
from mlx_model.train import BEST, LATEST, train

from .prepare import TRAIN, VAL, VOCAB
from .progress import training_reporter
from .store import ArtifactStore, StageOutput, code_version, finished

METRICS = "metrics.json"
WEIGHTS = f"{BEST}/{checkpoint.WEIGHTS}"  # the best model, which later stages load


def best_model(trained: StageOutput) -> Path:
    """The folder of the best model a train stage wrote (for `load_model`)."""
    return Path(trained.path) / BEST


@task(name="train", cache_policy=NO_CACHE)
def train_model(
    store: ArtifactStore,
    tokens: StageOutput,
    vocab: StageOutput,
    model: GPTConfig,
    training: TrainConfig,
    force: bool = False,
) -> StageOutput:
    """Train the GPT; resumes from the stage's latest checkpoint if one exists."""
    v = Vocab.load(vocab.file(VOCAB))
    cfg = model.replace(vocab_size=v.size)
    key = {
        "train": tokens.digest(TRAIN),
        "val": tokens.digest(VAL),
        "vocab": vocab.digest(VOCAB),
        "model": cfg.to_dict(),
        "training": training.to_dict(),
        "code": code_version(__name__),
        "ops": ops.signature(training.compute_dtype),
    }

    def compute(directory: Path) -> dict:
        if force:
            shutil.rmtree(directory / LATEST, ignore_errors=True)
        train_ids, _ = read_tokens(tokens.file(TRAIN))
        val_ids, _ = read_tokens(tokens.file(VAL))
        with training_reporter(training.max_iters, f"training {directory.name}") as report:
            result = train(cfg, training, train_ids, val_ids, directory, callback=report)
        shutil.copyfile(vocab.file(VOCAB), directory / VOCAB)
        metrics = {
            "best_val_loss": result.best_val_loss,
            "best_step": result.best_step,
            "final_step": result.final_step,
            "resumed_from": result.resumed_from,
            "tokens_per_sec": result.tokens_per_sec,
            "history": result.history,
        }
        write_text_atomic(directory / METRICS, json.dumps(metrics, indent=2))
        return {k: v for k, v in metrics.items() if k != "history"}

    config = f"{BEST}/{checkpoint.CONFIG}"
    return finished(store.run("train", key, compute, [WEIGHTS, config, VOCAB, METRICS], force))
