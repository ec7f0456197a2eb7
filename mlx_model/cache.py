"""The KV cache: one layer's keys and values, kept for generation."""

from __future__ import annotations

import mlx.core as mx

from . import ops


class KVCache:
    """Keys and values of one layer in buffers of the full context, (B, H, block_size, D).

    `offset` (an int32 array of shape (1,)) counts the positions filled so far;
    `update_and_fetch` writes new keys and values after them and returns the whole
    buffers, and `mask` says which buffer positions each new query may see. Shapes
    never change, so a compiled decoding step compiles once. Generation re-encodes
    before the buffers overflow.
    """

    def __init__(
        self, keys: mx.array, values: mx.array, offset: mx.array, filled: int | None = None
    ):
        self.keys, self.values, self.offset = keys, values, offset
        self.filled = filled  # `offset` as a Python int, where this process knows it

    @classmethod
    def empty(cls, batch: int, n_head: int, block_size: int, head_dim: int) -> KVCache:
        zeros = mx.zeros((batch, n_head, block_size, head_dim))
        return cls(zeros, zeros, mx.zeros((1,), mx.int32), filled=0)

    def positions(self, length: int) -> mx.array:
        """Absolute positions (length,) of `length` tokens that continue the sequence."""
        return self.offset + mx.arange(length, dtype=mx.int32)

    def mask(self, length: int) -> mx.array:
        """(length, block_size): which buffer positions each of `length` new queries sees."""
        return mx.arange(self.keys.shape[2])[None, :] <= self.positions(length)[:, None]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Store keys and values (B, H, T, D) after the filled positions; return the buffers.

        Where the filled count is known here (a cache this process emptied and filled: the
        prompt's prefill), the write is at fixed positions; else (a compiled or op-by-op
        step's cache, rebuilt from arrays) at `offset`, as the ops backend writes it
        (`ops.cache_write`: on MLX's CUDA backend a write at an array offset is a kernel
        compiled at first use, so one position is written by a select instead)."""
        T, start = keys.shape[2], self.filled
        if start is not None and start + T <= self.keys.shape[2]:
            self.keys = _write_at(self.keys, keys, start)
            self.values = _write_at(self.values, values, start)
            self.filled = start + T
        else:
            self.keys = ops.cache_write(self.keys, keys, self.offset)
            self.values = ops.cache_write(self.values, values, self.offset)
            self.filled = None
        self.offset = self.offset + T
        return self.keys, self.values

    @property
    def state(self) -> list[mx.array]:
        """The arrays, for `mx.compile` and `mx.eval`; `KVCache(*state)` rebuilds it."""
        return [self.keys, self.values, self.offset]


def _write_at(buffer: mx.array, new: mx.array, start: int) -> mx.array:
    """`buffer` (B, H, L, D) with positions start..start+T replaced by `new` (B, H, T, D)."""
    end = start + new.shape[2]
    parts = [buffer[:, :, :start], new.astype(buffer.dtype), buffer[:, :, end:]]
    return mx.concatenate(parts, axis=2)
