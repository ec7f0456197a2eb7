from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from mlx_model.config import DataConfig
from mlx_model.data import (
    Vocab,
    read_tokens,
    sequential_windows,
    split_tokens,
    train_batch,
    write_tokens,
)


def test_vocab_of_tiny_shakespeare(corpus_path):
    text = corpus_path.read_text()
    vocab = Vocab.from_text(text)
    assert vocab.size == 65
    assert vocab.chars == "".join(sorted(set(text)))
    ids = vocab.encode(text)
    assert ids.dtype == np.uint8
    assert vocab.decode(ids[:1000]) == text[:1000]


def test_encode_rejects_characters_outside_vocabulary():
    vocab = Vocab("abc ")
    with pytest.raises(ValueError, match=r"outside the vocabulary: 'xz'"):
        vocab.encode("a zax")


def test_vocab_dtype_grows_with_size():
    assert Vocab("".join(chr(i) for i in range(300, 600))).dtype == np.uint16


def test_vocab_save_load(tmp_path):
    vocab = Vocab("\n !abc")
    vocab.save(tmp_path / "v.json")
    assert Vocab.load(tmp_path / "v.json") == vocab


def test_empty_corpus_is_rejected():
    with pytest.raises(ValueError, match="corpus is empty"):
        Vocab.from_text("")


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_val_fraction_outside_unit_interval(fraction):
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\)"):
        DataConfig(val_fraction=fraction)
    with pytest.raises(ValueError, match=r"val_fraction must be in \(0, 1\)"):
        split_tokens(np.arange(100), fraction)


def test_arrow_round_trip_is_memory_mapped(tmp_path):
    ids = np.arange(1000, dtype=np.uint8) % 65
    write_tokens(tmp_path / "t.arrow", ids, {"split": "train", "corpus_sha256": "abc"})
    back, meta = read_tokens(tmp_path / "t.arrow")
    np.testing.assert_array_equal(back, ids)
    assert back.dtype == np.uint8
    assert meta == {"split": "train", "corpus_sha256": "abc"}
    assert not back.flags.writeable  # a view of the mapped file, not a copy
    schema = pa.ipc.open_file(pa.memory_map(str(tmp_path / "t.arrow"))).schema
    assert schema.field("tokens").type == pa.uint8()


def test_train_batch_is_a_function_of_seed_and_step():
    ids = np.arange(500) % 50
    x1, y1 = train_batch(ids, 8, 4, seed=1, step=7)
    x2, _ = train_batch(ids, 8, 4, seed=1, step=7)
    x3, _ = train_batch(ids, 8, 4, seed=1, step=8)
    np.testing.assert_array_equal(x1, x2)
    assert not np.array_equal(x1, x3)
    np.testing.assert_array_equal(x1[:, 1:], y1[:, :-1])
    assert x1.shape == (4, 8) and x1.dtype == np.int32


def test_context_longer_than_split_is_rejected():
    with pytest.raises(
        ValueError, match=r"split of 10 tokens is shorter than block_size \+ 1 = 17"
    ):
        train_batch(np.arange(10), 16, 2, seed=0, step=0)


def test_sequential_windows_cover_every_target_once():
    ids = np.arange(23)
    targets = np.concatenate([y for _, y in sequential_windows(ids, 5)])
    np.testing.assert_array_equal(targets, np.arange(1, 23))
