"""Character vocabulary, token files in Arrow IPC, and batch sampling."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from .files import atomic_path


@dataclass(frozen=True)
class Vocab:
    """A character vocabulary: position in `chars` is the token id."""

    chars: str

    def __post_init__(self) -> None:
        if not self.chars:
            raise ValueError("vocabulary is empty")
        if len(set(self.chars)) != len(self.chars):
            raise ValueError("vocabulary has repeated characters")

    @classmethod
    def from_text(cls, text: str) -> Vocab:
        if not text:
            raise ValueError("corpus is empty: cannot build a vocabulary")
        return cls("".join(sorted(set(text))))

    @property
    def size(self) -> int:
        return len(self.chars)

    @property
    def dtype(self) -> np.dtype:
        """Smallest unsigned integer dtype that holds every token id."""
        for dt in (np.uint8, np.uint16, np.uint32):
            if self.size - 1 <= np.iinfo(dt).max:
                return np.dtype(dt)
        raise ValueError(f"vocabulary too large: {self.size}")

    def _table(self) -> np.ndarray:
        codes = np.frombuffer(self.chars.encode("utf-32-le"), dtype=np.uint32)
        table = np.full(int(codes.max()) + 1, -1, dtype=np.int64)
        table[codes] = np.arange(self.size)
        return table

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text` (vectorised); raises naming characters outside the vocabulary."""
        codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        table = self._table()
        ids = np.full(codes.shape, -1, dtype=np.int64)
        inside = codes < table.size
        ids[inside] = table[codes[inside]]
        if (ids < 0).any():
            bad = sorted({chr(c) for c in codes[ids < 0]})
            raise ValueError(f"text has characters outside the vocabulary: {''.join(bad)!r}")
        return ids.astype(self.dtype)

    def decode(self, ids) -> str:
        table = np.frombuffer(self.chars.encode("utf-32-le"), dtype=np.uint32)
        return table[np.asarray(ids, dtype=np.int64)].tobytes().decode("utf-32-le")

    def to_json(self) -> str:
        return json.dumps({"chars": self.chars, "size": self.size}, ensure_ascii=False)

    def digest(self) -> str:
        return hashlib.sha256(self.chars.encode("utf-8")).hexdigest()

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            tmp.write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Vocab:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        vocab = cls(data["chars"])
        if vocab.size != data.get("size"):
            raise ValueError(f"{path}: size {data.get('size')} does not match its characters")
        return vocab


def split_tokens(ids: np.ndarray, val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """First (1 - val_fraction) of the tokens for training, the rest for validation."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    n = int(len(ids) * (1.0 - val_fraction))
    if n < 2 or len(ids) - n < 2:
        raise ValueError(
            f"corpus of {len(ids)} tokens is too small to split with val_fraction={val_fraction}"
        )
    return ids[:n], ids[n:]


def write_tokens(path: Path, ids: np.ndarray, metadata: dict[str, str]) -> None:
    """Write `ids`, a 1-D array of integer token ids of any integer dtype, as the one
    column `tokens` of an Arrow IPC file at `path`, atomically, with `metadata` (values
    written as strings) in the file's schema. Raises ValueError for an array that is not
    1-D or not of integers.

    The column is made from the array's buffer, not by `pa.array`, which asks pandas
    whether a numpy array is one of its objects and so imports pandas wherever it is
    installed: 0.37 to 0.38 s of a first write and read against 0.004 s on an H200
    machine with pandas 3.0 and pyarrow 25 (`python bench/arrow_first_write.py --corpus
    input.txt`, docs/runs/arrow-first-write-h200-20261201n.txt), on the CLI's way to
    training."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            f"token ids must be a 1-D integer array, got shape {ids.shape} {ids.dtype}"
        )
    ids = np.ascontiguousarray(ids, dtype=ids.dtype.newbyteorder("="))  # Arrow's native order
    column = pa.Array.from_buffers(
        pa.from_numpy_dtype(ids.dtype), len(ids), [None, pa.py_buffer(ids)]
    )
    table = pa.table({"tokens": column})
    table = table.replace_schema_metadata({k: str(v) for k, v in metadata.items()})
    with atomic_path(path) as tmp:
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)


def read_tokens(path: Path) -> tuple[np.ndarray, dict[str, str]]:
    """Memory-map an Arrow token file; returns its `tokens` column as a read-only 1-D
    numpy array of the column's integer dtype (a view of the mapped file when the column
    is one chunk, as `write_tokens` writes it) and the file's metadata. Raises ValueError
    naming the file when it has no `tokens` column or the column holds nulls or no
    integers."""
    source = pa.memory_map(str(path), "r")
    table = pa.ipc.open_file(source).read_all()
    if "tokens" not in table.column_names:
        raise ValueError(f"{path}: no tokens column (columns: {table.column_names})")
    column = table.column("tokens")
    if column.num_chunks != 1:
        column = pa.chunked_array([pa.concat_arrays(column.chunks)])
    array = column.chunk(0)
    if array.null_count or not pa.types.is_integer(array.type):
        raise ValueError(f"{path}: tokens must be integers without nulls, got {array.type}")
    # a view of the mapped buffer, as to_numpy(zero_copy_only=True) gives, without its
    # conversion machinery, which imports pandas where it is installed (write_tokens);
    # the dtype too (pyarrow 25's to_pandas_dtype asks pandas for its version)
    kind = "uint" if pa.types.is_unsigned_integer(array.type) else "int"
    dtype = np.dtype(f"{kind}{array.type.bit_width}")
    ids = np.frombuffer(
        array.buffers()[1], dtype=dtype, count=len(array), offset=array.offset * dtype.itemsize
    )
    ids.flags.writeable = False  # also where chunks were joined into a copy
    meta = {k.decode(): v.decode() for k, v in (table.schema.metadata or {}).items()}
    return ids, meta


def window_starts(n_tokens: int, block_size: int, count: int, rng: np.random.Generator):
    high = n_tokens - block_size - 1
    if high < 0:
        raise ValueError(
            f"split of {n_tokens} tokens is shorter than block_size + 1 = {block_size + 1}"
        )
    return rng.integers(0, high + 1, size=count)


def get_batch(ids: np.ndarray, starts: np.ndarray, block_size: int):
    """Inputs and next-token targets (B, T) as int32 numpy arrays for the given window starts."""
    offsets = starts[:, None] + np.arange(block_size + 1)[None, :]
    windows = ids[offsets].astype(np.int32)  # (B, T + 1)
    return windows[:, :-1], windows[:, 1:]


def train_batch(ids: np.ndarray, block_size: int, batch_size: int, seed: int, step: int):
    """The batch for `step`: random windows, a pure function of (seed, step), so resume is exact."""
    rng = np.random.default_rng([seed, step])
    return get_batch(ids, window_starts(len(ids), block_size, batch_size, rng), block_size)


def fixed_windows(ids: np.ndarray, block_size: int, count: int, seed: int) -> np.ndarray:
    """Window starts (int64, shape (count,) or fewer) for loss estimates, the same on every
    call: `count` windows at seeded random positions, or, where the split holds no more
    than `count` windows side by side, each of those: every token of the split but those
    of its last partial window. So a small split (Tiny Shakespeare's validation split at
    context 256: 435 windows, where `nanogpt-char` asks for 512, leaving out 179 of its
    111,539 tokens) is estimated from nearly all of itself, with fewer tokens than random
    windows would take to cover it. Raises ValueError for a split
    shorter than `block_size + 1` tokens or a negative `count`."""
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    side_by_side = (len(ids) - 1) // block_size
    if 0 < side_by_side <= count:
        return np.arange(side_by_side, dtype=np.int64) * block_size
    return window_starts(len(ids), block_size, count, np.random.default_rng([seed, 2**31]))


def sequential_windows(ids: np.ndarray, block_size: int):
    """Non-overlapping windows covering the split; the last is shorter when it does not divide."""
    n = len(ids) - 1
    for start in range(0, n, block_size):
        end = min(start + block_size, n)
        yield ids[start:end].astype(np.int32), ids[start + 1 : end + 1].astype(np.int32)


def file_sha256(path: os.PathLike | str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
