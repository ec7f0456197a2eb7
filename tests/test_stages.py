"""Each stage through `task.fn`, on the real corpus and the tiny preset."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlx_model.config import TINY, DataConfig, SampleConfig
from mlx_model.data import read_tokens
from tasks.download import SourceConfig, download_corpus
from tasks.evaluate import evaluate_model
from tasks.prepare import build_vocab, read_corpus, tokenize
from tasks.sample import sample_model
from tasks.store import ArtifactStore
from tasks.train import train_model


@pytest.fixture(scope="module")
def stages(corpus_path, corpus_sha, tmp_path_factory, prefect_harness):
    store = ArtifactStore(tmp_path_factory.mktemp("artifacts"))
    corpus = download_corpus.fn(store, SourceConfig(str(corpus_path), corpus_sha))
    vocab = build_vocab.fn(store, corpus)
    tokens = tokenize.fn(store, corpus, vocab, DataConfig(0.1))
    return store, corpus, vocab, tokens


def test_vocab_stage(stages):
    _, _, vocab, _ = stages
    data = json.loads(vocab.file("vocab.json").read_text())
    assert data["size"] == 65 and len(data["chars"]) == 65


def test_tokenize_stage(stages, corpus_sha):
    _, _, vocab, tokens = stages
    train_ids, meta = read_tokens(tokens.file("train.arrow"))
    val_ids, vmeta = read_tokens(tokens.file("val.arrow"))
    assert len(train_ids) == 1_003_854 and len(val_ids) == 111_540
    assert train_ids.dtype == np.uint8
    assert meta["corpus_sha256"] == corpus_sha
    assert meta["vocab_sha256"] == vocab.digest("vocab.json")
    assert (meta["split"], vmeta["split"]) == ("train", "val")


def test_train_evaluate_sample_stages(stages):
    store, _, vocab, tokens = stages
    model = train_model.fn(store, tokens, vocab, TINY.model, TINY.train)
    metrics = json.loads(model.file("metrics.json").read_text())
    history = metrics["history"]
    assert history[-1]["val_loss"] < history[0]["val_loss"] < 4.2
    evaluation = evaluate_model.fn(store, model, tokens)
    result = json.loads(evaluation.file("eval.json").read_text())
    assert result["tokens"] == 111_539
    assert result["val_loss"] < 4.0
    assert result["bits_per_char"] == pytest.approx(result["val_loss"] / np.log(2))
    cfg = SampleConfig(prompt="ROMEO:", max_tokens=50, seed=7)
    text = sample_model.fn(store, model, cfg).file("sample.txt").read_text()
    assert text.startswith("ROMEO:") and len(text) == 56
    again = sample_model.fn(store, model, cfg, force=True).file("sample.txt").read_text()
    assert again == text  # same seed, same text


def test_sample_rejects_prompt_outside_vocabulary(stages):
    store, _, vocab, tokens = stages
    model = train_model.fn(store, tokens, vocab, TINY.model, TINY.train)
    with pytest.raises(ValueError, match=r"outside the vocabulary: '€'"):
        sample_model.fn(store, model, SampleConfig(prompt="to €"))


@pytest.mark.parametrize(
    "content, match",
    [(b"", "is empty"), (b"   \n", "is empty"), (b"\xff\xfe\x00bad", "not UTF-8 text")],
)
def test_bad_corpus(tmp_path, content, match):
    path = tmp_path / "input.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match):
        read_corpus(path)


def test_corrupted_artifact_is_recomputed(stages):
    store, corpus, vocab, tokens = stages
    path = tokens.file("val.arrow")
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    again = tokenize.fn(store, corpus, vocab, DataConfig(0.1))
    assert not again.cached
    assert again.digest("val.arrow") == tokens.digest("val.arrow")


def test_the_stages_metrics_name_the_attention_that_ran(stages, monkeypatch):
    """A resumed run keeps the attention its checkpoint began with, which may differ from
    the one this process would choose: the metrics record the one that ran."""
    import dataclasses

    import tasks.train as stage

    store, _, vocab, tokens = stages
    signature, real_train = stage.ops.signature, stage.train
    monkeypatch.setattr(
        stage.ops, "signature", lambda *a, **k: {**signature(*a, **k), "attention": "cudnn"}
    )
    monkeypatch.setattr(
        stage, "train", lambda *a, **k: dataclasses.replace(real_train(*a, **k), attention="mlx")
    )
    model = train_model.fn(store, tokens, vocab, TINY.model, TINY.train, force=True)
    metrics = json.loads(model.file("metrics.json").read_text())
    assert metrics["attention"] == metrics["runtime"]["attention"] == "mlx"


def test_half_precision_on_the_cpu_is_warned_before_training(stages, caplog):
    """A GPU preset (bfloat16) run on a machine without a GPU said nothing while it
    trained far slower than float32 (13x to 62x for the quick preset's model,
    docs/BENCHMARKS.md): the stage warns, naming the dtype and the fix; float32 gets no
    warning."""
    import logging

    import mlx.core as mx

    if mx.default_device() != mx.cpu:
        pytest.skip("the warning is for the CPU")
    store, _, vocab, tokens = stages
    short = TINY.train.replace(max_iters=2, eval_interval=2, checkpoint_interval=2)
    warned = []
    for dtype in ("bfloat16", "float32"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="shakespeare_gpt"):
            train_model.fn(
                store, tokens, vocab, TINY.model, short.replace(compute_dtype=dtype), force=True
            )
        warned.append([r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING])
    assert len(warned[0]) == 1 and warned[1] == []
    assert warned[0][0].startswith("compute_dtype bfloat16 on the CPU: measured 13x to 62x")
    assert "--set training.compute_dtype=float32" in warned[0][0]
