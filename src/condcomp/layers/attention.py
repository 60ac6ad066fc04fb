"""Multi-head self-attention with rotary positions on PyTorch's fused SDPA kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from condcomp.layers.rotary import Rotary


class Attention(nn.Module):
    """Self-attention. x: [batch, seq, d_model] -> [batch, seq, d_model].

    causal=True masks the future (decoder); causal=False attends everywhere (encoder).
    padding_mask (optional): [batch, seq] bool, True = real token; padded keys are never attended.
    """

    def __init__(self, *, d_model: int, n_heads: int, max_len: int, causal: bool = True,
                 rope_base: float = 10000.0, dropout: float = 0.0):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.head_dim = d_model // n_heads
        self.causal = causal
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        self.rotary = Rotary(self.head_dim, max_len, rope_base)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = self.rotary.apply(q), self.rotary.apply(k)
        mask = None
        if padding_mask is not None:
            mask = padding_mask[:, None, None, :]  # [b, 1, 1, t] keys
            if self.causal:
                mask = mask & torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            is_causal=self.causal and mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(y.transpose(1, 2).reshape(b, t, d))
