"""Generate text from the trained model."""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from mlx_model import ops
from mlx_model.checkpoint import load_model
from mlx_model.config import SampleConfig
from mlx_model.data import Vocab
from mlx_model.files import write_text_atomic
from mlx_model.generate import generate_text, stream_text

from .prepare import VOCAB
from .progress import terminal_bar
from .store import ArtifactStore, StageOutput, code_version, finished
from .train import WEIGHTS, best_model

TEXT = "sample.txt"


def sample_text(model_dir: Path, vocab: Vocab, cfg: SampleConfig, stream: bool = False) -> str:
    """Prompt plus continuation, ending before the stop string if one is given.

    With `stream`, the text goes to stdout as it is generated.
    """
    gpt = load_model(model_dir)
    if not stream:
        return generate_text(gpt, vocab, cfg)
    pieces = [cfg.prompt]
    with terminal_bar("sample", "sample", cfg.max_tokens) as bar:
        sys.stdout.write(f"----- sample -----\n{cfg.prompt}")
        for piece in stream_text(gpt, vocab, cfg):
            pieces.append(piece)
            sys.stdout.write(piece)
            if not bar:  # under the live bars stdout goes through them, a line at a time
                sys.stdout.flush()
            if bar:
                chars = sum(map(len, pieces)) - len(cfg.prompt)  # one token per character
                bar(completed=chars, figures=f"{chars}/{cfg.max_tokens} characters")
        sys.stdout.write("\n")
    return "".join(pieces)


@task(name="sample", cache_policy=NO_CACHE)
def sample_model(
    store: ArtifactStore,
    model: StageOutput,
    sampling: SampleConfig,
    force: bool = False,
    stream: bool = False,
) -> StageOutput:
    """Sample text from the trained model; same seed, same text. `stream` prints it as it comes."""
    vocab = Vocab.load(model.file(VOCAB))
    vocab.encode(sampling.prompt)  # fail early, naming characters outside the vocabulary
    key = {
        "weights": model.digest(WEIGHTS),
        "sampling": sampling.to_dict(),
        "code": code_version(__name__),
        "ops": ops.signature("float32", training=False),
    }

    def compute(directory: Path) -> dict:
        text = sample_text(best_model(model), vocab, sampling, stream)
        write_text_atomic(directory / TEXT, text)
        return {"chars": len(text), "text": text}

    return finished(store.run("sample", key, compute, [TEXT], force))
