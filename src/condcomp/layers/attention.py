"""Multi-head self-attention with rotary positions on PyTorch's fused SDPA kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from condcomp.layers.info import LayerInfo
from condcomp.layers.kv_cache import KVCache
from condcomp.layers.rotary import Rotary


class Attention(nn.Module):
    """Self-attention. x: [batch, seq, d_model] -> (y [batch, seq, d_model], LayerInfo()).

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

    supports_cache = True

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: KVCache | None = None) -> tuple[torch.Tensor, LayerInfo]:
        """x: [b, t, d]. positions: [b, t] original positions of the tokens (default 0..t-1, or
        continuing the cache); with positions, causality follows them (a query sees keys at
        positions <= its own). cache: appends this call's real tokens' keys/values and attends over
        everything cached (incremental decoding)."""
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if positions is None and cache is None:
            return self._contiguous(q, k, v, padding_mask), LayerInfo()
        if positions is None:
            positions = (cache.offset + torch.arange(t, device=x.device)).expand(b, t)
        valid = torch.ones(b, t, dtype=torch.bool, device=x.device) if padding_mask is None else padding_mask
        q, k = self.rotary.apply_at(q, positions), self.rotary.apply_at(k, positions)
        k_pos, k_valid = positions, valid
        if cache is not None:
            k, v, k_pos, k_valid = cache.update(k, v, positions, valid)
        mask = k_valid[:, None, :]  # [b, 1(q), L]
        if self.causal:
            mask = mask & (k_pos[:, None, :] <= positions[:, :, None])
        # Padded queries attend everywhere: their rows are discarded, and a fully masked row would be NaN.
        mask = mask | ~valid[:, :, None]
        y = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask[:, None],
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(b, t, d)), LayerInfo()

    def _contiguous(self, q, k, v, padding_mask):
        b, _, t, _ = q.shape
        q, k = self.rotary.apply(q), self.rotary.apply(k)
        mask = None
        if padding_mask is not None:
            mask = padding_mask[:, None, None, :]  # [b, 1, 1, t] keys
            if self.causal:
                mask = mask & torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
            mask = mask | ~padding_mask[:, None, :, None]  # padded queries: see note in forward
        y = F.scaled_dot_product_attention(
            q, k, v,
            attn_mask=mask,
            is_causal=self.causal and mask is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.out(y.transpose(1, 2).reshape(b, t, -1))
