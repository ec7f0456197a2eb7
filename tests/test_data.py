from __future__ import annotations

import re

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


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int64])
def test_arrow_round_trip_of_views_and_wider_ids(tmp_path, dtype):
    """The column is built from the array's buffer: a strided view and an offset slice
    are written as their own values, in their own dtype."""
    ids = (np.arange(3000) % 300).astype(dtype)
    for name, view in (("strided", ids[::3]), ("tail", ids[1001:])):
        write_tokens(tmp_path / f"{name}.arrow", view, {})
        back, _ = read_tokens(tmp_path / f"{name}.arrow")
        np.testing.assert_array_equal(back, view)
        assert back.dtype == dtype


def test_token_ids_that_are_not_1d_integers_are_refused_and_byte_order_is_kept(tmp_path):
    path = tmp_path / "t.arrow"
    for bad in (np.arange(6).reshape(2, 3), np.arange(3, dtype=np.float32)):
        shape = re.escape(f"got shape {bad.shape} {bad.dtype}")
        with pytest.raises(ValueError, match=f"1-D integer array, {shape}"):
            write_tokens(path, bad, {})
    assert not path.exists()
    big_endian = np.arange(300, dtype=">u2")
    write_tokens(path, big_endian, {})
    back, _ = read_tokens(path)
    assert back.tolist() == list(range(300)) and back.dtype == np.uint16


def test_a_file_of_chunks_reads_whole_and_read_only_and_one_without_tokens_is_refused(
    tmp_path,
):
    chunked = pa.table({"tokens": pa.chunked_array([[1, 2], [3]], type=pa.uint8())})
    other = pa.table({"ids": pa.array([1, 2], type=pa.uint8())})
    for name, table in (("chunked", chunked), ("other", other)):
        with pa.OSFile(str(tmp_path / f"{name}.arrow"), "wb") as sink:
            with pa.ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
    back, _ = read_tokens(tmp_path / "chunked.arrow")
    assert back.tolist() == [1, 2, 3] and not back.flags.writeable
    with pytest.raises(ValueError, match=r"other.arrow: no tokens column \(columns: \['ids'\]\)"):
        read_tokens(tmp_path / "other.arrow")


def test_a_token_file_of_floats_or_nulls_is_refused_naming_its_type(tmp_path):
    for name, column in (("floats", pa.array([1.0, 2.0])), ("nulls", pa.array([1, None]))):
        path = tmp_path / f"{name}.arrow"
        table = pa.table({"tokens": column})
        with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
        with pytest.raises(ValueError, match=f"{name}.arrow: tokens must be integers without "
                           f"nulls, got {column.type}"):  # fmt: skip
            read_tokens(path)


def test_writing_and_reading_tokens_never_imports_pandas(tmp_path):
    """pyarrow asks pandas about a numpy array given to `pa.array`, importing it where it is
    installed (0.37 s of a first write on a GPU machine). A stand-in pandas records any
    import."""
    import subprocess
    import sys
    from pathlib import Path

    fake = tmp_path / "site" / "pandas"
    fake.mkdir(parents=True)
    marker = tmp_path / "pandas-imported"
    (fake / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nraise ImportError('a stand-in')\n"
    )
    root = Path(__file__).resolve().parents[1]
    code = (
        "import numpy as np, sys\n"
        "from mlx_model.data import read_tokens, write_tokens\n"
        f"write_tokens({str(tmp_path / 't.arrow')!r}, np.arange(100, dtype=np.uint8), {{}})\n"
        f"assert read_tokens({str(tmp_path / 't.arrow')!r})[0].sum() == 4950\n"
    )
    env = {"PYTHONPATH": f"{fake.parent}:{root}", "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not marker.exists()


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
