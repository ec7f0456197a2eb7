"""The KV cache: one layer's keys and values, kept for generation."""

from __future__ import annotations

import mlx.core as mx


class KVCache:
    """Keys and values of one layer in buffers of the full context, (B, H, block_size, D).

    `offset` (an int32 array of shape (1,)) counts the positions filled so far;
    `update_and_fetch` writes new keys and values after them and returns the whole
    buffers, and `mask` says which buffer positions each new query may see. Shapes
    never change, so a compiled decoding step compiles once. Generation re-encodes
    before the buffers overflow.
    """

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array):
        self.keys, self.values, self.offset = keys, values, offset

    @classmethod
    def empty(cls, batch: int, n_head: int, block_size: int, head_dim: int) -> KVCache:
        zeros = mx.zeros((batch, n_head, block_size, head_dim))
        return cls(zeros, zeros, mx.zeros((1,), mx.int32))

    def positions(self, length: int) -> mx.array:
        """Absolute positions (length,) of `length` tokens that continue the sequence."""
        return self.offset + mx.arange(length, dtype=mx.int32)

    def mask(self, length: int) -> mx.array:
        """(length, block_size): which buffer positions each of `length` new queries sees."""
        return mx.arange(self.keys.shape[2])[None, :] <= self.positions(length)[:, None]

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Store keys and values (B, H, T, D) after the filled positions; return the buffers."""
        self.keys = mx.slice_update(self.keys, keys, self.offset, axes=(2,))
        self.values = mx.slice_update(self.values, values, self.offset, axes=(2,))
        self.offset = self.offset + keys.shape[2]
        return self.keys, self.values

    @property
    def state(self) -> list[mx.array]:
        """The arrays, for `mx.compile` and `mx.eval`; `KVCache(*state)` rebuilds it."""
        return [self.keys, self.values, self.offset]
