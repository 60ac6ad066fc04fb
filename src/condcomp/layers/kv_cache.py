"""Key/value cache for incremental decoding, per attention layer and per sequence.

Conditional blocks compute only some tokens, so each sequence of the batch has its own cache
length: a token that skips a block writes nothing into that block's cache.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of the tokens an attention layer has processed.

    k, v: [batch, heads, capacity, head_dim]; positions: [batch, capacity] (original token positions);
    length: [batch] int64, filled slots per sequence. Grows on demand.
    """

    def __init__(self) -> None:
        self.k = self.v = self.positions = self.length = None

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor):
        """Append the valid new tokens of each sequence, then return everything cached.

        k, v: [b, h, s, hd]; positions, valid: [b, s]. Returns (k, v, positions, key_valid) with
        k, v: [b, h, L, hd] and positions, key_valid: [b, L], L = longest cache in the batch.
        """
        b, h, s, hd = k.shape
        if self.k is None:
            self.k = k.new_zeros(b, h, 0, hd)
            self.v = v.new_zeros(b, h, 0, hd)
            self.positions = positions.new_zeros(b, 0)
            self.length = torch.zeros(b, dtype=torch.int64, device=k.device)
        slot = self.length[:, None] + torch.cumsum(valid.to(torch.int64), dim=1) - 1  # [b, s]
        new_length = self.length + valid.sum(1)
        need = int(new_length.max())
        if need > self.k.shape[2]:
            grow = max(need, 2 * self.k.shape[2]) - self.k.shape[2]
            self.k = torch.cat([self.k, self.k.new_zeros(b, h, grow, hd)], dim=2)
            self.v = torch.cat([self.v, self.v.new_zeros(b, h, grow, hd)], dim=2)
            self.positions = torch.cat([self.positions, self.positions.new_zeros(b, grow)], dim=1)
        rows, cols = valid.nonzero(as_tuple=True)
        slots = slot[rows, cols]
        self.k[rows, :, slots] = k[rows, :, cols].to(self.k.dtype)
        self.v[rows, :, slots] = v[rows, :, cols].to(self.v.dtype)
        self.positions[rows, slots] = positions[rows, cols]
        self.length = new_length
        L = need
        key_valid = torch.arange(L, device=k.device)[None, :] < self.length[:, None]
        return self.k[:, :, :L], self.v[:, :, :L], self.positions[:, :L], key_valid


class ModelCache:
    """The per-layer caches of one model plus the number of tokens consumed so far (``offset``)."""

    def __init__(self) -> None:
        self.offset = 0
        self.layers: dict[str, KVCache] = {}

    def layer(self, name: str) -> KVCache:
        return self.layers.setdefault(name, KVCache())
