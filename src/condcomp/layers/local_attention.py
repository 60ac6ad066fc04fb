"""Sliding-window attention in blocks: O(seq * window) time and memory."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from condcomp.layers.rotary import Rotary


class LocalAttention(nn.Module):
    """Each query attends to keys within ``window`` positions: |i - j| <= window (encoder) or
    0 <= i - j <= window (causal). x: [batch, seq, d_model] -> same shape.

    The sequence is cut into blocks of ``window`` tokens; a block's queries attend to its own block
    and its neighbours (previous only when causal), masked to the exact window, so no [seq, seq]
    score matrix is ever formed.

    Args: d_model; n_heads and head_dim of this attention (n_heads * head_dim may be < d_model, as in
    CoLT5's light branch); window > 0; causal; max_len for rotary positions.
    """

    def __init__(self, *, d_model: int, n_heads: int, head_dim: int, window: int, causal: bool, max_len: int,
                 rope_base: float = 10000.0, dropout: float = 0.0):
        super().__init__()
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.n_heads, self.head_dim, self.window, self.causal = n_heads, head_dim, window, causal
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * n_heads * head_dim, bias=False)
        self.out = nn.Linear(n_heads * head_dim, d_model, bias=False)
        self.rotary = Rotary(head_dim, max_len, rope_base)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        h, hd, w = self.n_heads, self.head_dim, self.window
        q, k, v = self.qkv(x).view(b, t, 3, h, hd).permute(2, 0, 3, 1, 4)  # [b, h, t, hd]
        q, k = self.rotary.apply(q), self.rotary.apply(k)
        nb = -(-t // w)
        pad = nb * w - t
        real = torch.ones(b, t, dtype=torch.bool, device=x.device) if padding_mask is None else padding_mask
        if pad:
            q, k, v = (F.pad(z, (0, 0, 0, pad)) for z in (q, k, v))
            real = F.pad(real, (0, pad), value=False)
        qb = q.view(b, h, nb, w, hd)
        kb, vb, rb = k.view(b, h, nb, w, hd), v.view(b, h, nb, w, hd), real.view(b, nb, w)
        shifts = (-1, 0) if self.causal else (-1, 0, 1)  # neighbour blocks each query block sees
        kc = torch.cat([_shift(kb, s, dim=2) for s in shifts], dim=3)  # [b, h, nb, len(shifts)*w, hd]
        vc = torch.cat([_shift(vb, s, dim=2) for s in shifts], dim=3)
        key_real = torch.cat([_shift(rb, s, dim=1) for s in shifts], dim=2)  # [b, nb, c*w]
        # Positions: query i*w + r; key (i + s)*w + c.
        r = torch.arange(w, device=x.device)
        kpos_rel = torch.cat([s * w + r for s in shifts])  # [c*w], relative to the block start
        diff = r[:, None] - kpos_rel[None, :]  # query - key
        band = (diff >= 0) & (diff <= w) if self.causal else diff.abs() <= w
        mask = band[None, None] & key_real[:, :, None, :]  # [b, nb, w, c*w]
        mask = mask | ~rb[..., None]  # padded queries see everything (rows discarded; avoids NaN)
        y = F.scaled_dot_product_attention(qb, kc, vc, attn_mask=mask[:, None],
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.reshape(b, h, nb * w, hd)[:, :, :t]
        return self.out(y.transpose(1, 2).reshape(b, t, h * hd))


def _shift(z: torch.Tensor, s: int, dim: int) -> torch.Tensor:
    """Block i receives block i + s (zeros/False beyond the ends)."""
    if s == 0:
        return z
    n = z.shape[dim]
    if s < 0:
        body = z.narrow(dim, 0, n + s)
        fill = torch.zeros_like(z.narrow(dim, 0, -s))
        return torch.cat([fill, body], dim=dim)
    body = z.narrow(dim, s, n - s)
    fill = torch.zeros_like(z.narrow(dim, 0, s))
    return torch.cat([body, fill], dim=dim)
