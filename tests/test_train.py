from __future__ import annotations

import numpy as np
import pytest

from mlx_model.checkpoint import load_model
from mlx_model.config import PRESETS, TINY
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


def test_a_run_no_launcher_started_asks_no_distributed_backend(splits, tmp_path, monkeypatch):
    """A single process's training takes its group of one without MLX's backend search,
    which runs MPI_Init where MPI is installed (`mlx_model.distributed.process_group`)."""
    import mlx.core as mx

    from mlx_model import distributed

    for name in distributed.LAUNCHED_ENV:
        monkeypatch.delenv(name, raising=False)
    asked = []
    real = mx.distributed.init

    def spy(strict=False, backend="any"):
        asked.append(backend)
        return real(strict=strict, backend=backend)

    monkeypatch.setattr(mx.distributed, "init", spy)
    train_ids, val_ids = splits
    tc = TINY.train.replace(max_iters=2, eval_interval=2, checkpoint_interval=2)
    train(TINY.model.replace(vocab_size=65), tc, train_ids, val_ids, tmp_path)
    assert asked and set(asked) == {"ring"}


def test_muon_trains_the_block_matrices_and_resumes_exactly(splits, tmp_path):
    """With optimizer=muon, Muon holds the blocks' weight matrices and AdamW the rest; it
    trains, and a stopped run resumes to the same result as an uninterrupted one."""
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    from mlx_model.model import GPT
    from mlx_model.train import make_optimizer

    train_ids, val_ids = splits
    cfg = TINY.model.replace(vocab_size=65)
    tc = TINY.train.replace(optimizer="muon", muon_learning_rate=0.02)
    opt = make_optimizer(tc)
    opt.init(GPT(cfg).trainable_parameters())
    muon, adamw = (dict(tree_flatten(s)) for s in opt.state["states"])
    assert isinstance(opt.optimizers[0], optim.Muon)
    assert any(k.startswith("h.0.attn.c_attn.weight") for k in muon)
    assert not any(k.startswith(("wte", "wpe", "ln_f")) or ".bias" in k for k in muon)
    assert any(k.startswith("wte.weight") for k in adamw)
    full = train(cfg, tc, train_ids, val_ids, tmp_path / "full")
    assert full.history[-1]["val_loss"] < full.history[0]["val_loss"] - 0.3
    train(cfg, tc, train_ids, val_ids, tmp_path / "resumed", stop_after=20)
    second = train(cfg, tc, train_ids, val_ids, tmp_path / "resumed")
    assert second.resumed_from == 20
    assert [h["val_loss"] for h in second.history] == [h["val_loss"] for h in full.history]


def test_checkpoint_writes_from_a_snapshot_make_no_mlx_call(tmp_path, monkeypatch):
    """The checkpoint thread writes host copies taken at their step and never calls MLX,
    which must not run on two threads at once (a 2-GPU run crashed when it did)."""
    import mlx.core as mx

    from mlx_model.checkpoint import load_train_state, save_train_state, snapshot
    from mlx_model.model import GPT
    from mlx_model.train import make_optimizer

    cfg = TINY.model.replace(vocab_size=65)
    model, optimizer = GPT(cfg), make_optimizer(TINY.train)
    optimizer.init(model.trainable_parameters())
    taken = snapshot(model, optimizer)
    assert all(isinstance(a, np.ndarray) for part in taken.values() for a in part.values())
    before = np.array(model.wte.weight)
    model.wte.weight = model.wte.weight + 1.0  # training goes on after the snapshot

    def no_mlx(*args, **kwargs):
        raise AssertionError("the checkpoint writer called MLX")

    with monkeypatch.context() as m:
        for name in ("eval", "save_safetensors", "save", "array"):
            m.setattr(mx, name, no_mlx)
        save_train_state(tmp_path, model, optimizer, {"step": 7}, taken)
    fresh, opt = GPT(cfg), make_optimizer(TINY.train)
    assert load_train_state(tmp_path, fresh, opt)["step"] == 7
    np.testing.assert_array_equal(np.array(fresh.wte.weight), before)
    assert set(opt.state) == set(optimizer.state)


def test_batched_muon_is_mlx_muon_with_batched_newton_schulz():
    """In float32, the batched form moves every parameter as MLX's Muon does (tall, wide
    and square matrices, two of one shape, a vector) and keeps the same state."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx.utils import tree_flatten

    from mlx_model.train import BatchedMuon

    shapes = {"tall": (48, 16), "wide": [(16, 48), (16, 16), (16, 16)], "vector": (8,)}
    key = iter(mx.random.split(mx.random.key(0), 32))

    def tree():
        return {
            k: [mx.random.normal(s, key=next(key)) for s in v]
            if isinstance(v, list)
            else mx.random.normal(v, key=next(key))
            for k, v in shapes.items()
        }

    mlx_muon, batched = optim.Muon(0.02, weight_decay=0.01), BatchedMuon(0.02, weight_decay=0.01)
    a = b = tree()
    for _ in range(3):
        grads = tree()
        a, b = mlx_muon.apply_gradients(grads, a), batched.apply_gradients(grads, b)
    flat_b = dict(tree_flatten(b))
    assert list(flat_b) == [k for k, _ in tree_flatten(a)]
    for name, value in tree_flatten(a):
        np.testing.assert_allclose(np.array(flat_b[name]), np.array(value), atol=1e-6)
    state = dict(tree_flatten(batched.state))
    for name, value in tree_flatten(mlx_muon.state):
        np.testing.assert_allclose(np.array(state[name]), np.array(value), atol=1e-6)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_recipe_takes_compiled_steps(name):
    """Each preset's optimizer, schedule, dtype and dropout placement train a small model of
    its kind for a few compiled steps (its own shape would take minutes on 2 cores)."""
    import mlx.core as mx

    from mlx_model.config import get_preset
    from mlx_model.model import GPT
    from mlx_model.train import DTYPES, make_optimizer, make_step

    preset = get_preset(name)
    cfg = TINY.model.replace(
        vocab_size=65,
        dropout=preset.model.dropout,
        attention_dropout=preset.model.attention_dropout,
    )
    mx.random.seed(0)
    model, optimizer = GPT(cfg), make_optimizer(preset.train)
    optimizer.init(model.trainable_parameters())
    model.train()
    step = make_step(model, optimizer, preset.train, DTYPES[preset.train.compute_dtype])
    rng = np.random.default_rng(0)
    x = mx.array(rng.integers(0, 65, (4, cfg.block_size)), mx.int32)
    before = np.array(model.h[0].attn.c_attn.weight)
    losses = [step(x, x).item() for _ in range(3)]
    assert all(np.isfinite(losses))
    assert not np.array_equal(np.array(model.h[0].attn.c_attn.weight), before)


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


def test_early_stopping_ends_after_patience_estimates_and_resumes_exactly(splits, tmp_path):
    train_ids, val_ids = splits
    cfg = TINY.model.replace(vocab_size=65)
    # a rate this high stops improving early; every step is estimated
    tc = TINY.train.replace(max_iters=200, eval_interval=5, learning_rate=0.3, patience=3)
    full = train(cfg, tc, train_ids, val_ids, tmp_path / "full")
    assert full.stopped_early and full.final_step < tc.max_iters
    assert full.final_step == full.best_step + 3 * tc.eval_interval  # 3 estimates after the best
    assert len(full.train_log) == full.final_step // tc.log_interval  # a point per log interval
    part = train(cfg, tc, train_ids, val_ids, tmp_path / "part", stop_after=full.best_step + 5)
    assert not part.stopped_early
    rest = train(cfg, tc, train_ids, val_ids, tmp_path / "part")
    assert rest.final_step == full.final_step and rest.best_step == full.best_step
    assert [h["val_loss"] for h in rest.history] == [h["val_loss"] for h in full.history]


def test_compiled_estimate_equals_the_plain_mean_loss(splits):
    import mlx.core as mx

    from mlx_model.data import fixed_windows, get_batch
    from mlx_model.model import GPT, loss_fn
    from mlx_model.train import estimate_loss, make_loss_sum

    train_ids, _ = splits
    model = GPT(TINY.model.replace(vocab_size=65))
    model.eval()
    starts = fixed_windows(train_ids, 16, 40, 1)
    estimate = estimate_loss(make_loss_sum(model), train_ids, starts, 16, 8)
    plain = [loss_fn(model, *map(mx.array, get_batch(train_ids, starts[i : i + 8], 16))).item()
             for i in range(0, 40, 8)]  # fmt: skip
    assert estimate == pytest.approx(sum(plain) / len(plain), rel=1e-5)


def test_an_estimate_of_a_small_split_is_its_exact_loss_and_a_large_one_samples(splits):
    from mlx_model.data import fixed_windows
    from mlx_model.evaluate import evaluate
    from mlx_model.model import GPT
    from mlx_model.train import estimate_loss, make_loss_sum

    train_ids, val_ids = splits
    block = 16
    val = val_ids[: 40 * block + 1]  # 40 windows side by side, no partial one
    model = GPT(TINY.model.replace(vocab_size=65))
    model.eval()
    starts = fixed_windows(val, block, 64, 1)  # asks for more windows than the split holds
    assert starts.tolist() == [k * block for k in range(40)]
    exact = evaluate(model, val, batch_size=8)["val_loss"]
    assert estimate_loss(make_loss_sum(model), val, starts, block, 8) == pytest.approx(
        exact, rel=1e-5
    )
    assert fixed_windows(val, block, 40, 1).tolist() == starts.tolist()  # as many: all
    sampled = fixed_windows(val, block, 39, 1)  # fewer than the split holds: seeded random
    assert len(sampled) == 39 and sampled.tolist() == fixed_windows(val, block, 39, 1).tolist()
    assert sampled.tolist() != starts[:39].tolist()
    with pytest.raises(ValueError, match="shorter than block_size"):
        fixed_windows(val[:block], block, 4, 1)
    with pytest.raises(ValueError, match="count must be >= 0, got -1"):
        fixed_windows(val, block, -1, 1)


def test_the_install_extras_keep_one_mlx_build():
    import tomllib
    from pathlib import Path

    meta = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    project = meta["project"]
    assert not any("mlx[" in d for d in project["dependencies"])  # no build in the base
    extras = project["optional-dependencies"]
    assert any(d.startswith("mlx[cuda13]") for d in extras["cuda"])
    assert any(d.startswith("mlx[cpu]") for d in extras["cpu"])
    assert not any("cpu" in d for d in extras["cuda"])


def test_average_gradients_sends_the_exchange_dtype(monkeypatch):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from mlx_model.distributed import process_group
    from mlx_model.train import average_gradients

    sent = []
    real = nn.average_gradients

    def spy(grads, group=None, **kw):
        sent.extend(g.dtype for _, g in tree_flatten(grads))
        return real(grads, group=group, **kw)

    monkeypatch.setattr(nn, "average_gradients", spy)
    grads = {"w": mx.array([[1.0 + 2**-12, 2.0]]), "b": mx.array([0.1])}
    out = average_gradients(grads, process_group(), mx.bfloat16)
    assert sent == [mx.bfloat16, mx.bfloat16]
    assert out["w"].dtype == mx.float32 and out["b"].dtype == mx.float32
    assert out["w"].tolist() == [[1.0, 2.0]]  # rounded to bfloat16 on the way
    sent.clear()
    same = average_gradients(grads, process_group(), mx.float32)
    assert sent == [mx.float32, mx.float32] and same["w"].tolist() == grads["w"].tolist()
