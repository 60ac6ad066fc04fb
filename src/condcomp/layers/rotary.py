"""Rotary position embeddings (Su et al., 2021), the half-split ("GPT-NeoX", Llama) layout.

The tables are computed the way the Llama family computes them (inverse frequencies and angles in
float32), so a model brought in from Hugging Face gets bit-identical cos/sin values; ``llama3``
scaling (Llama 3.1) stretches the low frequencies for long contexts.
"""

from __future__ import annotations

import math

import torch

from condcomp.device import can_read_back
from torch import nn

SCALINGS = ("none", "llama3")


def inverse_frequencies(head_dim: int, base: float, *, scaling: str = "none", factor: float = 8.0,
                        low_freq_factor: float = 1.0, high_freq_factor: float = 4.0,
                        original_max_len: int = 8192) -> torch.Tensor:
    """[head_dim / 2] float32 inverse frequencies base^(-2i/d), with optional llama3 scaling."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if scaling == "none":
        return inv_freq
    if scaling != "llama3":
        raise ValueError(f"rope scaling must be one of {SCALINGS}, got {scaling!r}")
    # Llama 3.1: wavelengths longer than the original context / low_freq_factor are divided by factor,
    # shorter than context / high_freq_factor kept, and those between interpolated smoothly.
    low_wavelen = original_max_len / low_freq_factor
    high_wavelen = original_max_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    """Precomputed cos/sin tables for positions [0, max_len).

    apply(x, offset): x [batch, heads, seq, head_dim] -> same shape, positions offset..offset+seq-1.
    apply_at(x, positions): the same with explicit positions [batch, seq] (tokens gathered from a
    longer sequence keep their original positions).
    """

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0, **scaling):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary positions, got {head_dim}")
        inv_freq = inverse_frequencies(head_dim, base, **scaling)
        angles = torch.arange(max_len, dtype=torch.int64).float()[:, None] * inv_freq  # [max_len, hd/2] fp32
        # Not persistent: derived from the config, so checkpoints stay weights-only.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
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
        # The readable error where reading the maximum back is free (CPU): on CUDA an out-of-range
        # position still fails, as a device-side index assertion.
        if can_read_back(positions) and positions.numel() and int(positions.max()) >= self.max_len:
            raise ValueError(f"position {int(positions.max())} exceeds the model's seq_len {self.max_len}")
        cos = self.cos[positions].to(x.dtype)[:, None]  # [b, 1, seq, hd/2]
        sin = self.sin[positions].to(x.dtype)[:, None]
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
