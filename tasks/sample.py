"""Generate text from the trained model."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from mlx_model.checkpoint import load_model
from mlx_model.config import SampleConfig
from mlx_model.data import Vocab
from mlx_model.generate import generate
from mlx_model.io import write_text_atomic

from .prepare import VOCAB
from .store import ArtifactStore, StageOutput, code_version
from .train import WEIGHTS

TEXT = "sample.txt"


def sample_text(model_dir: Path, vocab: Vocab, cfg: SampleConfig) -> str:
    """Prompt plus generated continuation, cut at the stop string if one is given."""
    gpt = load_model(model_dir)
    prompt_ids = vocab.encode(cfg.prompt)
    ids = generate(
        gpt,
        prompt_ids,
        cfg.max_tokens,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        seed=cfg.seed,
    )
    text = vocab.decode(ids)
    if cfg.stop and cfg.stop in text:
        text = text[: text.index(cfg.stop) + len(cfg.stop)]
    return cfg.prompt + text


@task(name="sample", cache_policy=NO_CACHE)
def sample_model(
    store: ArtifactStore, model: StageOutput, sampling: SampleConfig, force: bool = False
) -> StageOutput:
    """Sample text from the trained model; same seed, same text."""
    vocab = Vocab.load(model.file(VOCAB))
    vocab.encode(sampling.prompt)  # fail early, naming characters outside the vocabulary
    key = {
        "weights": model.digest(WEIGHTS),
        "sampling": sampling.to_dict(),
        "code": code_version("mlx_model.model", "mlx_model.generate", __name__),
    }

    def compute(directory: Path) -> dict:
        text = sample_text(Path(model.path) / "best", vocab, sampling)
        write_text_atomic(directory / TEXT, text)
        return {"chars": len(text), "text": text}

    return store.run("sample", key, compute, [TEXT], force)
