"""Multi-head self-attention with rotary positions on PyTorch's fused SDPA kernel (short bf16 sequences
on CPU: ``layers.sdpa``'s materialized form); grouped-query attention (fewer key/value heads than
query heads) as in Llama 2/3, Mistral and Qwen2."""

from __future__ import annotations

import torch
from torch import nn

from condcomp.layers.info import LayerInfo
from condcomp.layers.kv_cache import KVCache
from condcomp.layers.rotary import Rotary
from condcomp.layers.sdpa import attention


class Attention(nn.Module):
    """Self-attention. x: [batch, seq, d_model] -> (y [batch, seq, d_model], LayerInfo()).

    causal=True masks the future (decoder); causal=False attends everywhere (encoder).
    padding_mask (optional): [batch, seq] bool, True = real token; padded keys are never attended.

    Args:
        d_model, n_heads: width and query heads.
        n_kv_heads: key/value heads (default n_heads; fewer = grouped-query attention, must divide n_heads).
        head_dim: per-head width (default d_model / n_heads).
        qkv_bias, out_bias: biases on the q/k/v projections (Qwen2) and on the output projection.
        rope: extra keyword arguments of ``Rotary`` (llama3 scaling).
    Parameters: ``qkv`` [(n_heads + 2 n_kv_heads) head_dim, d_model] (q, then k, then v), ``out``.
    """

    supports_cache = True

    def __init__(self, *, d_model: int, n_heads: int, max_len: int, causal: bool = True,
                 rope_base: float = 10000.0, dropout: float = 0.0, n_kv_heads: int | None = None,
                 head_dim: int | None = None, qkv_bias: bool = False, out_bias: bool = False,
                 rope: dict | None = None):
        super().__init__()
        n_kv_heads = n_kv_heads or n_heads
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads} (or pass head_dim)")
            head_dim = d_model // n_heads
        if n_heads % n_kv_heads:
            raise ValueError(f"n_kv_heads={n_kv_heads} must divide n_heads={n_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.causal = causal
        self.dropout = dropout
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * head_dim, bias=qkv_bias)
        self.out = nn.Linear(n_heads * head_dim, d_model, bias=out_bias)
        self.rotary = Rotary(head_dim, max_len, rope_base, **(rope or {}))

    def projections(self) -> dict[str, torch.Tensor]:
        """Views of the weights by role: q [h hd, d], k and v [kv hd, d], o [d, h hd], and q/k/v
        biases when present (the layout ``AttentionExperts.set_expert`` takes)."""
        h, kv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        w = self.qkv.weight
        parts = {"q": w[: h * hd], "k": w[h * hd : (h + kv) * hd], "v": w[(h + kv) * hd :], "o": self.out.weight}
        if self.qkv.bias is not None:
            b = self.qkv.bias
            parts.update(q_bias=b[: h * hd], k_bias=b[h * hd : (h + kv) * hd], v_bias=b[(h + kv) * hd :])
        return parts

    def _project(self, x: torch.Tensor):
        """x [b, t, d] -> q [b, h, t, hd], k and v [b, kv_heads, t, hd]."""
        b, t, _ = x.shape
        h, kv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        q, k, v = self.qkv(x).split([h * hd, kv * hd, kv * hd], dim=-1)
        return (q.view(b, t, h, hd).transpose(1, 2), k.view(b, t, kv, hd).transpose(1, 2),
                v.view(b, t, kv, hd).transpose(1, 2))

    def _attend(self, q, k, v, mask, is_causal: bool = False) -> torch.Tensor:
        return attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, is_causal=is_causal,
                         dropout_p=self.dropout if self.training else 0.0, enable_gqa=self.n_kv_heads != self.n_heads)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: KVCache | None = None) -> tuple[torch.Tensor, LayerInfo]:
        """x: [b, t, d]. positions: [b, t] original positions of the tokens (default 0..t-1, or
        continuing the cache); with positions, causality follows them (a query sees keys at
        positions <= its own). cache: appends this call's real tokens' keys/values and attends over
        everything cached (incremental decoding)."""
        b, t, _ = x.shape
        q, k, v = self._project(x)
        head_weights, info = self.head_weights(x)
        if positions is None and cache is None:
            return self._contiguous(q, k, v, padding_mask, head_weights), info
        if positions is None and padding_mask is None and cache.uniform:
            return self._decode_uniform(q, k, v, cache, head_weights), info
        if positions is None:
            raise ValueError("a ragged key/value cache needs the tokens' positions")
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
        y = self._attend(q, k, v, mask[:, None])
        return self._merge_heads(y, head_weights), info

    def head_weights(self, x: torch.Tensor) -> tuple[torch.Tensor | None, LayerInfo]:
        """Per-token weights of each query head's output, [b, t, n_heads], and the layer's info; plain
        attention weighs every head 1 (None). Attention experts override this with their gates."""
        return None, LayerInfo()

    def _merge_heads(self, y: torch.Tensor, head_weights: torch.Tensor | None) -> torch.Tensor:
        """y [b, heads, t, head_dim] -> the output projection of the concatenated (weighted) heads [b, t, d]."""
        y = y.transpose(1, 2)  # [b, t, heads, head_dim]
        if head_weights is not None:
            y = y * head_weights.to(y.dtype)[..., None]
        return self.out(y.reshape(*y.shape[:2], -1))

    def _decode_uniform(self, q, k, v, cache: KVCache, head_weights=None) -> torch.Tensor:
        """Every sequence at the same position (cache.size): append by slicing, and mask only when a
        query could see a key after it (several new tokens on a non-empty cache)."""
        t = q.shape[2]
        offset = cache.size
        q, k = self.rotary.apply(q, offset), self.rotary.apply(k, offset)
        k_all, v_all = cache.append(k.to(cache.k.dtype) if cache.k is not None else k,
                                    v.to(cache.v.dtype) if cache.v is not None else v)
        mask = None
        if t > 1 and offset > 0:
            mask = torch.ones(t, offset + t, dtype=torch.bool, device=q.device).tril(diagonal=offset)
        y = self._attend(q, k_all, v_all, mask, is_causal=t > 1 and offset == 0)
        return self._merge_heads(y, head_weights)

    def _contiguous(self, q, k, v, padding_mask, head_weights=None):
        t = q.shape[2]
        q, k = self.rotary.apply(q), self.rotary.apply(k)
        mask = None
        if padding_mask is not None:
            mask = padding_mask[:, None, None, :]  # [b, 1, 1, t] keys
            if self.causal:
                mask = mask & torch.ones(t, t, dtype=torch.bool, device=q.device).tril()
            mask = mask | ~padding_mask[:, None, :, None]  # padded queries: see note in forward
        y = self._attend(q, k, v, mask, is_causal=self.causal and mask is None)
        return self._merge_heads(y, head_weights)
