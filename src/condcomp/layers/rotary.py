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


def rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [..., hd] rotated pairwise (half layout: x[i] pairs with x[i + hd/2]) by angles with the given
    cos, sin [..., hd/2] (broadcast against x): the plain formula, differentiated by autograd (the twin
    of ``_Rotate``)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class _Rotate(torch.autograd.Function):
    """y = x * C + roll(x, hd/2) * S with C = [cos, cos] and S = [-sin, sin] (both [..., hd]).

    The same function as ``rotate_reference`` in three kernels each way instead of about seven forward
    and ten backward, and nothing of x is saved: a rotation is linear, so dL/dx = g * C + roll(g * S, hd/2)
    (rolling by half the width is its own transpose). The element-wise work of rotary embeddings was
    a visible share of a bf16 training step at small widths (docs/benchmarks.md, "Training step")."""

    @staticmethod
    def forward(ctx, x, c, s):
        ctx.save_for_backward(c, s)
        half = x.shape[-1] // 2
        return torch.addcmul(x * c, torch.roll(x, half, dims=-1), s)

    @staticmethod
    def backward(ctx, g):
        c, s = ctx.saved_tensors
        half = g.shape[-1] // 2
        return torch.addcmul(torch.roll(g * s, half, dims=-1), g, c), None, None


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
        # Not persistent: derived from the config, so checkpoints stay weights-only. Full-width tables for
        # _Rotate: C = [cos, cos], S = [-sin, sin] ([max_len, hd] fp32).
        cos, sin = angles.cos(), angles.sin()
        self.register_buffer("cos_full", torch.cat((cos, cos), dim=-1), persistent=False)
        self.register_buffer("sin_signed", torch.cat((-sin, sin), dim=-1), persistent=False)
        self.max_len = max_len

    @property
    def cos(self) -> torch.Tensor:
        """[max_len, hd/2] cos of each position's angles (a view of the full-width table)."""
        return self.cos_full[:, : self.cos_full.shape[1] // 2]

    @property
    def sin(self) -> torch.Tensor:
        """[max_len, hd/2] sin of each position's angles."""
        return self.sin_signed[:, self.sin_signed.shape[1] // 2 :]

    def apply(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        seq = x.shape[-2]
        if offset + seq > self.max_len:
            raise ValueError(f"position {offset + seq} exceeds the model's seq_len {self.max_len}")
        c = self.cos_full[offset : offset + seq].to(x.dtype)
        s = self.sin_signed[offset : offset + seq].to(x.dtype)
        return _Rotate.apply(x, c, s)

    def apply_at(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        # The readable error where reading the maximum back is free (CPU): on CUDA an out-of-range
        # position still fails, as a device-side index assertion.
        if can_read_back(positions) and positions.numel() and int(positions.max()) >= self.max_len:
            raise ValueError(f"position {int(positions.max())} exceeds the model's seq_len {self.max_len}")
        c = self.cos_full[positions].to(x.dtype)[:, None]  # [b, 1, seq, hd]
        s = self.sin_signed[positions].to(x.dtype)[:, None]
        return _Rotate.apply(x, c, s)
