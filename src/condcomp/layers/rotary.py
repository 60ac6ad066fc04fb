"""Rotary position embeddings (Su et al., 2021), the half-split ("GPT-NeoX") layout."""

import torch
from torch import nn


class Rotary(nn.Module):
    """Precomputed cos/sin tables for positions [0, max_len).

    apply(x, offset): x [batch, heads, seq, head_dim] -> same shape, positions offset..offset+seq-1.
    apply_at(x, positions): the same with explicit positions [batch, seq] (tokens gathered from a
    longer sequence keep their original positions).
    """

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary positions, got {head_dim}")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # [max_len, hd/2]
        # Not persistent: derived from the config, so checkpoints stay weights-only.
        self.register_buffer("cos", angles.cos().float(), persistent=False)
        self.register_buffer("sin", angles.sin().float(), persistent=False)
        self.max_len = max_len

    def apply(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        seq = x.shape[-2]
        if offset + seq > self.max_len:
            raise ValueError(f"position {offset + seq} exceeds the model's seq_len {self.max_len}")
        cos = self.cos[offset : offset + seq].to(x.dtype)
        sin = self.sin[offset : offset + seq].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)

    def apply_at(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if positions.numel() and int(positions.max()) >= self.max_len:
            raise ValueError(f"position {int(positions.max())} exceeds the model's seq_len {self.max_len}")
        cos = self.cos[positions].to(x.dtype)[:, None]  # [b, 1, seq, hd/2]
        sin = self.sin[positions].to(x.dtype)[:, None]
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
