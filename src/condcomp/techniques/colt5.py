"""CoLT5 (Ainslie et al., 2023), decoder form: a light branch for every token plus a heavy branch for
the routed ones, for the FFN (``ffn: conditional``) and for attention (``attention: conditional``).

    model: {ffn: conditional, attention: conditional, conditional: {capacity: 0.125, window: 32}}
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from condcomp import registry
from condcomp.layers.conditional import ConditionalAttention, ConditionalFeedForward, colt5_router
from condcomp.settings import ConfigError, Settings, setting


@dataclass
class ConditionalSettings(Settings):
    """Settings of ``ffn: conditional`` and ``attention: conditional`` (section ``model.conditional``)."""

    capacity: float = setting(0.125, gt=0.0, le=1.0, help="fraction of tokens routed to the heavy FFN")
    light_d_ff: int | None = setting(None, ge=1, help="default: half the dense FFN's hidden size")
    heavy_d_ff: int | None = setting(None, ge=1, help="default: 4x the dense FFN's hidden size")
    activation: str = setting("swiglu", choices=("gelu", "swiglu"),
                              help="of the light and heavy FFNs; in a grid, the base model's dense FFN's unless "
                                   "the variant sets it")
    window: int = setting(32, ge=1, help="light attention looks back this many tokens")
    light_heads: int | None = setting(None, ge=1, help="default: a quarter of n_heads (at least 1)")
    q_capacity: float = setting(0.125, gt=0.0, le=1.0)
    kv_capacity: float = setting(0.25, gt=0.0, le=1.0)


@registry.register("ffn", "conditional", settings=ConditionalSettings, section="conditional",
                   summary="CoLT5 FFN: light FFN on every token, heavy FFN on the routed ones",
                   activation=lambda model: model.conditional.activation, aux_loss_weights={"router_bce": 0.1})
def build_ffn(*, model, settings: ConditionalSettings, layer_idx: int) -> nn.Module:
    router = colt5_router(d_model=model.d_model, capacity=settings.capacity, causal=True)
    return ConditionalFeedForward(
        d_model=model.d_model, light_d_ff=settings.light_d_ff or max(1, model.ffn_hidden // 2),
        heavy_d_ff=settings.heavy_d_ff or 4 * model.ffn_hidden, router=router, activation=settings.activation,
        dropout=model.dropout)


def _validate_attention(model) -> None:
    if model.uses_llama_attention_features or model.rope_scaling.type != "none":
        raise ConfigError("attention: conditional has plain multi-head attention only; leave n_kv_heads, head_dim, "
                          "qkv_bias, out_bias and rope_scaling at their defaults")


@registry.register("attention", "conditional", settings=ConditionalSettings, section="conditional",
                   summary="CoLT5 attention: local attention for all, full attention among routed queries and keys",
                   aux_loss_weights={"router_bce": 0.1}, validate=_validate_attention)
def build_attention(*, model, settings: ConditionalSettings, layer_idx: int) -> nn.Module:
    q_router = colt5_router(d_model=model.d_model, capacity=settings.q_capacity, causal=True)
    kv_router = colt5_router(d_model=model.d_model, capacity=settings.kv_capacity, causal=True)
    return ConditionalAttention(d_model=model.d_model, n_heads=model.n_heads, max_len=model.seq_len, causal=True,
                                window=settings.window, light_heads=settings.light_heads, q_router=q_router,
                                kv_router=kv_router, rope_base=model.rope_base, dropout=model.dropout)


registry.register_claim(
    "colt5.equal_flops", statement="{variant} ends at or below {baseline} at equal training FLOPs",
    paper="Ainslie et al., 2023: CoLT5 trains 35-75% faster than LongT5 at equal or better quality (16k-token "
          "encoder inputs)",
    test="lower_loss", view="flops")
