"""Residual blocks: the unit a model stacks and a token-selecting layer wraps.

The block interface every block shares:
``forward(x [b, t, d], padding_mask=None, positions=None, cache=None) -> (y [b, t, d], LayerInfo)``.
padding_mask [b, t]: True = real token. positions [b, t]: original positions when the block runs on
tokens gathered from a longer sequence. cache: a ModelCache for incremental decoding.
"""

from __future__ import annotations

import torch
from torch import nn

from condcomp.layers.info import LayerInfo
from condcomp.layers.kv_cache import KVCache, ModelCache
from condcomp.layers.norm import RMSNorm
from condcomp.layers.sru import SRULayer


class TransformerBlock(nn.Module):
    """x + attn(norm(x)), then + ffn(norm(x)). The attention and feed-forward layers are passed in
    (any layers returning ``(y, LayerInfo)``); their aux losses and metrics come back under
    "attn." and "ffn.".

    Args:
        d_model: width. attn: attention layer (called with padding_mask, and positions/cache when
            given). ffn: feed-forward layer. norm_eps: RMSNorm epsilon.
        layer_idx: this block's index in the model (names its slot in a ModelCache).
    """

    def __init__(self, *, d_model: int, attn: nn.Module, ffn: nn.Module, norm_eps: float = 1e-5, layer_idx: int = 0):
        super().__init__()
        self.layer_idx = layer_idx
        self.d_model = d_model
        self.attn_norm = RMSNorm(d_model, norm_eps)
        self.attn = attn
        self.ffn_norm = RMSNorm(d_model, norm_eps)
        self.ffn = ffn

    @property
    def supports_cache(self) -> bool:
        return bool(getattr(self.attn, "supports_cache", False))

    def _attention(self, h: torch.Tensor, padding_mask, positions, cache: ModelCache | None):
        """The attention layer on the normalised input h, with this block's slot of the cache."""
        kv = None
        if cache is not None:
            kv = cache.layer(f"layer{self.layer_idx}.attn", getattr(self.attn, "new_cache", KVCache))
            if positions is None and (padding_mask is not None or not kv.uniform):
                # A ragged cache keeps per-sequence positions; a uniform one knows its own offset.
                positions = (cache.offset + torch.arange(h.shape[1], device=h.device)).expand(h.shape[:2])
        if positions is None and kv is None:
            return self.attn(h, padding_mask=padding_mask)
        return self.attn(h, padding_mask=padding_mask, positions=positions, cache=kv)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: ModelCache | None = None):
        info = LayerInfo()
        y, attn_info = self._attention(self.attn_norm(x), padding_mask, positions, cache)
        info.add("attn", attn_info)
        x = x + y
        y, ffn_info = self.ffn(self.ffn_norm(x), padding_mask=padding_mask)
        info.add("ffn", ffn_info)
        return x + y, info


class ParallelBlock(TransformerBlock):
    """x + attn(norm(x)) + ffn(norm(x)): attention and FFN read the same normalised input (GPT-J,
    PaLM; BAM's seeds), one norm per block. Same interface and arguments as TransformerBlock; the
    norm is ``attn_norm`` and there is no ``ffn_norm``."""

    def __init__(self, *, d_model: int, attn: nn.Module, ffn: nn.Module, norm_eps: float = 1e-5, layer_idx: int = 0):
        super().__init__(d_model=d_model, attn=attn, ffn=ffn, norm_eps=norm_eps, layer_idx=layer_idx)
        del self.ffn_norm

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: ModelCache | None = None):
        info = LayerInfo()
        h = self.attn_norm(x)
        y_attn, attn_info = self._attention(h, padding_mask, positions, cache)
        info.add("attn", attn_info)
        y_ffn, ffn_info = self.ffn(h, padding_mask=padding_mask)
        info.add("ffn", ffn_info)
        return x + y_attn + y_ffn, info


class RecurrentBlock(nn.Module):
    """x + SRU(norm(x)) or x + SRU++(norm(x)): one recurrent layer in the residual stream, in place
    of attention + FFN (SRU++ has no FFN; its recurrence carries the state). Same interface as
    TransformerBlock; no key/value cache (generation recomputes).

    Args:
        d_model: width (and the number of cells). sru: the SRULayer (d_model -> d_model).
        norm_eps: RMSNorm epsilon.
    """

    supports_cache = False

    def __init__(self, *, d_model: int, sru: SRULayer, norm_eps: float = 1e-5):
        super().__init__()
        self.d_model = d_model
        self.norm = RMSNorm(d_model, norm_eps)
        self.sru = sru

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: ModelCache | None = None):
        if positions is not None or cache is not None:
            raise ValueError("recurrent blocks run on whole sequences: no positions (MoD) and no cache")
        real = None if padding_mask is None else padding_mask.t()
        h, _ = self.sru(self.norm(x).transpose(0, 1), None, real)
        return x + h.transpose(0, 1).to(x.dtype), LayerInfo()
