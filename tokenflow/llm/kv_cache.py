"""A preallocated key/value cache for next-scale sampling: one scale (many positions) per forward.

Every layer writes its new keys and values after the cached ones and attends to all of them; `crop(n)` drops the
last n positions (to re-run a scale with new inputs), `tail(n)` / `append(saved)` keep a copy of the last n
positions and put it back. The buffers are allocated once, at the first write, for `max_len` positions.
"""

from __future__ import annotations

from torch import Tensor


class KVCache:
    def __init__(self, num_layers: int, max_len: int):
        self.max_len = max_len
        self.keys: list[Tensor | None] = [None] * num_layers
        self.values: list[Tensor | None] = [None] * num_layers
        self.lengths = [0] * num_layers

    @property
    def length(self) -> int:
        """Positions cached (every layer holds the same number between forwards)."""
        return self.lengths[0]

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write (B, heads, n, d) keys and values after the cached ones; return all of them for attention."""
        if self.keys[layer] is None:
            b, h, _, d = k.shape
            self.keys[layer] = k.new_empty(b, h, self.max_len, d)
            self.values[layer] = v.new_empty(b, h, self.max_len, d)
        start, n = self.lengths[layer], k.shape[2]
        if start + n > self.max_len:
            raise ValueError(f"the cache holds {self.max_len} positions; {start} cached + {n} new do not fit")
        self.keys[layer][:, :, start : start + n] = k
        self.values[layer][:, :, start : start + n] = v
        self.lengths[layer] = start + n
        return self.keys[layer][:, :, : start + n], self.values[layer][:, :, : start + n]

    def crop(self, n: int) -> None:
        """Forget the last n positions (every layer)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot crop {n} of {self.length} cached positions")
        self.lengths = [length - n for length in self.lengths]

    def tail(self, n: int) -> list[tuple[Tensor, Tensor]]:
        """A copy of the last n positions of every layer."""
        end = self.length
        return [
            (k[:, :, end - n : end].clone(), v[:, :, end - n : end].clone()) for k, v in zip(self.keys, self.values)
        ]

    def append(self, saved: list[tuple[Tensor, Tensor]]) -> None:
        """Write positions saved by `tail` after the cached ones."""
        for layer, (k, v) in enumerate(saved):
            self.update(layer, k, v)

    def __repr__(self) -> str:
        return f"KVCache(layers={len(self.keys)}, length={self.length}, max_len={self.max_len})"
