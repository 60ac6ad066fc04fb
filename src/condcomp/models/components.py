"""Named components a config can put in a block: ``attention: causal``, ``ffn: swiglu``, ...

Each entry is a builder ``(cfg: ModelConfig, layer_idx: int) -> nn.Module``. Later layers register
here (``ffn: moe``, ``block: mod``, ...) and the Transformer picks them up by name, so adding a
technique never touches the model code.
"""

from __future__ import annotations

from typing import Callable

from torch import nn

from condcomp.layers.attention import Attention
from condcomp.layers.conditional import ConditionalAttention, ConditionalFeedForward
from condcomp.layers.feedforward import FeedForward
from condcomp.layers.moe import MoE
from condcomp.routing import ExpertChoiceRouter, TopKRouter

Builder = Callable[..., nn.Module]
_REGISTRY: dict[str, dict[str, Builder]] = {"attention": {}, "ffn": {}, "block": {}}


def register(kind: str, name: str):
    """Decorator: make ``builder`` available as ``<kind>: <name>`` in configs."""

    def wrap(builder: Builder) -> Builder:
        if name in _REGISTRY[kind]:
            raise ValueError(f"{kind} component {name!r} is already registered")
        _REGISTRY[kind][name] = builder
        return builder

    return wrap


def names(kind: str) -> tuple[str, ...]:
    _load_block_builders()
    return tuple(_REGISTRY[kind])


def build(kind: str, name: str, cfg, layer_idx: int) -> nn.Module:
    _load_block_builders()
    try:
        builder = _REGISTRY[kind][name]
    except KeyError:
        raise ValueError(f"unknown {kind} component {name!r}; available: {sorted(_REGISTRY[kind])}") from None
    return builder(cfg, layer_idx)


def _load_block_builders() -> None:
    # Blocks live with the model and register on import; importing lazily avoids a cycle.
    import condcomp.models.transformer  # noqa: F401


@register("attention", "causal")
def _causal_attention(cfg, layer_idx: int) -> nn.Module:
    return Attention(d_model=cfg.d_model, n_heads=cfg.n_heads, max_len=cfg.seq_len, causal=True,
                     rope_base=cfg.rope_base, dropout=cfg.dropout)


@register("ffn", "swiglu")
def _swiglu(cfg, layer_idx: int) -> nn.Module:
    return FeedForward(d_model=cfg.d_model, d_ff=cfg.ffn_hidden, activation="swiglu", dropout=cfg.dropout)


@register("ffn", "gelu")
def _gelu(cfg, layer_idx: int) -> nn.Module:
    return FeedForward(d_model=cfg.d_model, d_ff=cfg.ffn_hidden, activation="gelu", dropout=cfg.dropout)


@register("ffn", "moe")
def _moe(cfg, layer_idx: int) -> nn.Module:
    m = cfg.moe
    if (layer_idx + 1) % m.moe_every:
        return FeedForward(d_model=cfg.d_model, d_ff=cfg.ffn_hidden, activation=m.activation, dropout=cfg.dropout)
    if m.router == "top_k":
        router = TopKRouter(d_model=cfg.d_model, num_experts=m.num_experts, k=m.k,
                            capacity_factor=m.capacity_factor, renormalize=m.renormalize, jitter=m.jitter)
    else:
        router = ExpertChoiceRouter(d_model=cfg.d_model, num_experts=m.num_experts,
                                    capacity_factor=m.capacity_factor, mode=m.expert_choice_mode)
    return MoE(d_model=cfg.d_model, d_ff=m.d_ff or cfg.ffn_hidden, num_experts=m.num_experts, router=router,
               activation=m.activation, shared_expert_d_ff=m.shared_expert_d_ff)


@register("ffn", "conditional")
def _conditional_ffn(cfg, layer_idx: int) -> nn.Module:
    c = cfg.conditional
    return ConditionalFeedForward(d_model=cfg.d_model, light_d_ff=c.light_d_ff or max(1, cfg.ffn_hidden // 2),
                                  heavy_d_ff=c.heavy_d_ff or 4 * cfg.ffn_hidden, capacity=c.capacity, causal=True,
                                  activation=c.activation, dropout=cfg.dropout)


@register("attention", "conditional")
def _conditional_attention(cfg, layer_idx: int) -> nn.Module:
    c = cfg.conditional
    return ConditionalAttention(d_model=cfg.d_model, n_heads=cfg.n_heads, max_len=cfg.seq_len, causal=True,
                                window=c.window, light_heads=c.light_heads, q_capacity=c.q_capacity,
                                kv_capacity=c.kv_capacity, rope_base=cfg.rope_base, dropout=cfg.dropout)
