"""The dense parts every model starts from: causal attention, SwiGLU/GELU FFNs, the Transformer block."""

from __future__ import annotations

from torch import nn

from condcomp import registry
from condcomp.layers.attention import Attention
from condcomp.layers.blocks import ParallelBlock, TransformerBlock
from condcomp.layers.feedforward import FeedForward


@registry.register("attention", "causal", summary="multi-head self-attention, rotary positions, causal mask (SDPA)")
def build_causal_attention(*, model, settings, layer_idx: int) -> nn.Module:
    return Attention(d_model=model.d_model, n_heads=model.n_heads, max_len=model.seq_len, causal=True,
                     rope_base=model.rope_base, dropout=model.dropout, n_kv_heads=model.n_kv_heads,
                     head_dim=model.head_dim, qkv_bias=model.qkv_bias, out_bias=model.out_bias,
                     rope=model.rope_scaling.rotary_kwargs())


@registry.register("ffn", "swiglu", activation="swiglu", summary="dense SwiGLU feed-forward (Shazeer, 2020)")
def build_swiglu(*, model, settings, layer_idx: int) -> nn.Module:
    return FeedForward(d_model=model.d_model, d_ff=model.ffn_hidden, activation="swiglu", dropout=model.dropout)


@registry.register("ffn", "gelu", activation="gelu", summary="dense GELU feed-forward")
def build_gelu(*, model, settings, layer_idx: int) -> nn.Module:
    return FeedForward(d_model=model.d_model, d_ff=model.ffn_hidden, activation="gelu", dropout=model.dropout)


def transformer_block(*, model, layer_idx: int, block_class: type = TransformerBlock) -> TransformerBlock:
    """The pre-norm block with the model's attention and ffn techniques (other blocks wrap it)."""
    attn = registry.build("attention", model.attention, model=model, layer_idx=layer_idx)
    ffn = registry.build("ffn", model.ffn, model=model, layer_idx=layer_idx)
    return block_class(d_model=model.d_model, attn=attn, ffn=ffn, norm_eps=model.norm_eps, layer_idx=layer_idx)


@registry.register("block", "transformer", summary="pre-norm block: x + attn(norm x), then + ffn(norm x)")
def build_transformer_block(*, model, settings, layer_idx: int) -> nn.Module:
    return transformer_block(model=model, layer_idx=layer_idx)


@registry.register("block", "parallel", summary="parallel block: x + attn(norm x) + ffn(norm x), one norm (GPT-J, PaLM; BAM)")
def build_parallel_block(*, model, settings, layer_idx: int) -> nn.Module:
    return transformer_block(model=model, layer_idx=layer_idx, block_class=ParallelBlock)
