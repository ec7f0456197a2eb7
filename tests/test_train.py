from __future__ import annotations

import numpy as np
import pytest

from mlx_model.checkpoint import load_model
from mlx_model.config import TINY
from mlx_model.data import Vocab, split_tokens
from mlx_model.train import AdamWMatrices, lr_schedule, train


@pytest.fixture(scope="module")
def splits(corpus_path):
    text = corpus_path.read_text()[:200_000]
    return split_tokens(Vocab.from_text(text).encode(text), 0.1)


def test_stopped_and_resumed_run_matches_uninterrupted(splits, tmp_path):
    train_ids, val_ids = splits
    cfg = TINY.model.replace(vocab_size=65, dropout=0.1)  # dropout too, so its RNG must resume
    full = train(cfg, TINY.train, train_ids, val_ids, tmp_path / "full")
    first = train(cfg, TINY.train, train_ids, val_ids, tmp_path / "resumed", stop_after=20)
    assert first.final_step == 20 and first.resumed_from is None
    second = train(cfg, TINY.train, train_ids, val_ids, tmp_path / "resumed")
    assert second.resumed_from == 20
    assert [h["val_loss"] for h in second.history] == [h["val_loss"] for h in full.history]
    a = load_model(tmp_path / "full" / "best")
    b = load_model(tmp_path / "resumed" / "best")
    np.testing.assert_array_equal(np.array(a.wte.weight), np.array(b.wte.weight))


def test_training_reduces_loss(splits, tmp_path):
    train_ids, val_ids = splits
    result = train(TINY.model.replace(vocab_size=65), TINY.train, train_ids, val_ids, tmp_path)
    assert result.history[-1]["val_loss"] < result.history[0]["val_loss"] - 0.3


def test_lr_schedule_warms_up_then_decays_to_floor():
    tc = TINY.train.replace(max_iters=100, warmup_iters=10, learning_rate=1e-3, min_lr=1e-4)
    sched = lr_schedule(tc)
    assert float(sched(0)) == 0.0
    assert float(sched(10)) == pytest.approx(1e-3)
    assert float(sched(55)) < 1e-3
    assert float(sched(100)) == pytest.approx(1e-4)


def test_weight_decay_skips_vectors():
    import mlx.core as mx

    opt = AdamWMatrices(learning_rate=0.1, weight_decay=0.5)
    params = {"w": mx.ones((2, 2)), "b": mx.ones((2,))}
    grads = {"w": mx.zeros((2, 2)), "b": mx.zeros((2,))}
    opt.init(params)
    new = opt.apply_gradients(grads, params)
    assert float(new["b"][0]) == pytest.approx(1.0)  # zero gradient, no decay
    assert float(new["w"][0, 0]) == pytest.approx(1.0 - 0.1 * 0.5)


def test_corrupted_resume_checkpoint_is_refused_and_training_restarts(splits, tmp_path):
    train_ids, val_ids = splits
    cfg = TINY.model.replace(vocab_size=65)
    full = train(cfg, TINY.train, train_ids, val_ids, tmp_path / "full")
    train(cfg, TINY.train, train_ids, val_ids, tmp_path / "run", stop_after=20)
    optimizer_file = tmp_path / "run" / "latest" / "optimizer.safetensors"
    data = bytearray(optimizer_file.read_bytes())
    data[-5] ^= 0x01  # one flipped bit in the optimiser moments
    optimizer_file.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match=r"optimizer.safetensors does not match the SHA-256"):
        again = train(cfg, TINY.train, train_ids, val_ids, tmp_path / "run")
    assert again.resumed_from is None  # started over instead of trusting the file
    assert [h["val_loss"] for h in again.history] == [h["val_loss"] for h in full.history]
