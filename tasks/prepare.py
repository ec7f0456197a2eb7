"""Vocabulary and Arrow token files."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from mlx_model.config import DataConfig, SampleConfig
from mlx_model.data import Vocab, split_tokens, write_tokens

from .download import CORPUS
from .store import ArtifactStore, StageOutput, code_version, finished

VOCAB = "vocab.json"
TRAIN = "train.arrow"
VAL = "val.arrow"


def read_corpus(path: Path, name: str | None = None) -> str:
    """The corpus as text; raises naming it (`name`, what the user gave as the source, or
    else `path`) if it is empty or not UTF-8 text."""
    raw = Path(path).read_bytes()
    name = name or str(path)
    if not raw.strip():
        raise ValueError(f"corpus {name} is empty")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"corpus {name} is not UTF-8 text: {err}") from None
    if "\x00" in text:
        raise ValueError(f"corpus {name} is not text: it contains NUL bytes")
    return text


def _read(corpus: StageOutput) -> str:
    """The download stage's corpus, errors naming the source it came from (not the store's copy)."""
    return read_corpus(corpus.file(CORPUS), corpus.info.get("source"))


@task(name="vocab", cache_policy=NO_CACHE)
def build_vocab(store: ArtifactStore, corpus: StageOutput, force: bool = False) -> StageOutput:
    """Build the sorted character vocabulary of the corpus."""
    key = {"corpus": corpus.digest(CORPUS), "code": code_version(__name__)}

    def compute(directory: Path) -> dict:
        vocab = Vocab.from_text(_read(corpus))
        vocab.save(directory / VOCAB)
        return {"size": vocab.size}

    return finished(store.run("vocab", key, compute, [VOCAB], force))


@task(name="check-prompt", cache_policy=NO_CACHE)
def check_prompt(vocab: StageOutput, sampling: SampleConfig) -> None:
    """Refuse a prompt or stop string with characters outside the vocabulary, before training."""
    v = Vocab.load(vocab.file(VOCAB))
    v.encode(sampling.prompt)
    if sampling.stop:
        v.encode(sampling.stop)


@task(name="tokenize", cache_policy=NO_CACHE)
def tokenize(
    store: ArtifactStore,
    corpus: StageOutput,
    vocab: StageOutput,
    data: DataConfig,
    force: bool = False,
) -> StageOutput:
    """Encode the corpus and write train/val Arrow IPC files."""
    key = {
        "corpus": corpus.digest(CORPUS),
        "vocab": vocab.digest(VOCAB),
        "data": data.to_dict(),
        "code": code_version(__name__),
    }

    def compute(directory: Path) -> dict:
        v = Vocab.load(vocab.file(VOCAB))
        ids = v.encode(_read(corpus))
        train_ids, val_ids = split_tokens(ids, data.val_fraction)
        for name, split in ((TRAIN, train_ids), (VAL, val_ids)):
            meta = {
                "corpus_sha256": corpus.digest(CORPUS),
                "vocab_sha256": vocab.digest(VOCAB),
                "split": name.removesuffix(".arrow"),
                "val_fraction": data.val_fraction,
            }
            write_tokens(directory / name, split, meta)
        return {"train_tokens": len(train_ids), "val_tokens": len(val_ids), "dtype": str(ids.dtype)}

    return finished(store.run("tokenize", key, compute, [TRAIN, VAL], force))
