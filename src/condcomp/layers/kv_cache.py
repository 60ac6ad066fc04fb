"""Key/value cache for incremental decoding, per attention layer and per sequence.

Conditional blocks compute only some tokens, so each sequence of the batch may have its own cache
length: a token that skips a block writes nothing into that block's cache (``update``). A dense
layer writes every token of every sequence, and then the cache stays *uniform*: one length for the
batch, appended by slicing (``append``), with no per-sequence bookkeeping, the fast path of decoding.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of the tokens an attention layer has processed.

    k, v: [batch, kv_heads, capacity, head_dim], grown by doubling. Uniform while every update
    appended every token of every sequence at consecutive positions: ``size`` tokens each. After
    the first ragged ``update``, per sequence: positions [batch, capacity] (original token
    positions) and length [batch] (filled slots).
    """

    def __init__(self) -> None:
        self.k = self.v = None
        self.size = 0
        self.positions = self.length = None  # per-sequence bookkeeping, once the cache is ragged

    @property
    def uniform(self) -> bool:
        return self.length is None

    def _reserve(self, like_k: torch.Tensor, like_v: torch.Tensor, need: int) -> None:
        b, h, _, hd = like_k.shape
        if self.k is None:
            cap = max(need, 16)
            self.k = like_k.new_zeros(b, h, cap, hd)
            self.v = like_v.new_zeros(b, h, cap, hd)
            if self.positions is not None:
                self.positions = self.positions.new_zeros(b, cap)
            return
        if need > self.k.shape[2]:
            grow = max(need, 2 * self.k.shape[2]) - self.k.shape[2]
            self.k = torch.cat([self.k, self.k.new_zeros(b, h, grow, hd)], dim=2)
            self.v = torch.cat([self.v, self.v.new_zeros(b, h, grow, hd)], dim=2)
            if self.positions is not None:
                self.positions = torch.cat([self.positions, self.positions.new_zeros(b, grow)], dim=1)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Uniform cache: append s new tokens of every sequence. k, v: [b, h, s, hd].
        Returns every cached key and value, [b, h, size, hd]."""
        s = k.shape[2]
        self._reserve(k, v, self.size + s)
        self.k[:, :, self.size : self.size + s] = k
        self.v[:, :, self.size : self.size + s] = v
        self.size += s
        return self.k[:, :, : self.size], self.v[:, :, : self.size]

    def update(self, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor):
        """Append the valid new tokens of each sequence, then return everything cached.

        k, v: [b, h, s, hd]; positions, valid: [b, s]. Returns (k, v, positions, key_valid) with
        k, v: [b, h, L, hd] and positions, key_valid: [b, L], L = longest cache in the batch.
        """
        b, h, s, hd = k.shape
        if self.length is None:  # becoming ragged: per-sequence bookkeeping of what is cached so far
            self.length = torch.full((b,), self.size, dtype=torch.int64, device=k.device)
            self.positions = torch.arange(self.k.shape[2] if self.k is not None else 0,
                                          device=k.device).expand(b, -1).clone()
        slot = self.length[:, None] + torch.cumsum(valid.to(torch.int64), dim=1) - 1  # [b, s]
        new_length = self.length + valid.sum(1)
        need = int(new_length.max())
        self._reserve(k, v, need)
        rows, cols = valid.nonzero(as_tuple=True)
        slots = slot[rows, cols]
        self.k[rows, :, slots] = k[rows, :, cols].to(self.k.dtype)
        self.v[rows, :, slots] = v[rows, :, cols].to(self.v.dtype)
        self.positions[rows, slots] = positions[rows, cols]
        self.length = new_length
        self.size = need
        key_valid = torch.arange(need, device=k.device)[None, :] < self.length[:, None]
        return self.k[:, :, :need], self.v[:, :, :need], self.positions[:, :need], key_valid


class ModelCache:
    """The per-layer caches of one model plus the number of tokens consumed so far (``offset``)."""

    def __init__(self) -> None:
        self.offset = 0
        self.layers: dict[str, object] = {}

    def layer(self, name: str, factory=KVCache):
        """The cache of the layer called ``name``, made by ``factory()`` on first use (a layer with a
        cache of its own, such as sparse attention's, passes its ``new_cache``)."""
        if name not in self.layers:
            self.layers[name] = factory()
        return self.layers[name]
