"""SRU (Lei et al., 2017) and SRU++ (Lei, 2021) blocks: one recurrent layer of d_model cells per block.

    model: {block: srupp, recurrence: {attn_every: 1, attn_heads: 1}}
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from condcomp import registry
from condcomp.layers.blocks import RecurrentBlock
from condcomp.layers.sru import SRULayer, SRUppAttention
from condcomp.settings import ConfigError, Settings, setting


@dataclass
class RecurrenceSettings(Settings):
    """Settings of ``block: sru`` and ``block: srupp`` (section ``model.recurrence``)."""

    attn_every: int = setting(1, ge=1, help="srupp: layer i has the attention projection when (i + 1) % attn_every == 0")
    attn_size: int | None = setting(None, ge=1, help="srupp: attention width d'; default d_model / 4")
    attn_heads: int = setting(1, ge=1, help="srupp: attention heads (must divide attn_size)")
    highway_bias: float = setting(-2.0, help="initial reset-gate bias (SRU++: -2; SRU paper: 0)")


def _attn_size(model) -> int:
    rc = model.recurrence
    return rc.attn_size or max(rc.attn_heads, model.d_model // 4)


def _validate_srupp(model) -> None:
    rc = model.recurrence
    if _attn_size(model) % rc.attn_heads:
        raise ConfigError(f"recurrence.attn_heads: {rc.attn_heads} does not divide the attention width "
                          f"{_attn_size(model)} (recurrence.attn_size, default d_model / 4)")


def _block(model, settings: RecurrenceSettings, layer_idx: int, *, attention: bool) -> nn.Module:
    proj = None
    if attention and (layer_idx + 1) % settings.attn_every == 0:
        proj = SRUppAttention(model.d_model, _attn_size(model), 3 * model.d_model, n_heads=settings.attn_heads,
                              causal=True, dropout=model.dropout)
    sru = SRULayer(model.d_model, model.d_model, highway_bias=settings.highway_bias, input_proj=proj)
    return RecurrentBlock(d_model=model.d_model, sru=sru, norm_eps=model.norm_eps)


@registry.register("block", "sru", settings=RecurrenceSettings, section="recurrence",
                   summary="SRU: a recurrent layer in place of attention + FFN")
def build_sru(*, model, settings: RecurrenceSettings, layer_idx: int) -> nn.Module:
    return _block(model, settings, layer_idx, attention=False)


@registry.register("block", "srupp", settings=RecurrenceSettings, section="recurrence",
                   summary="SRU++: SRU whose input projection is a small attention", validate=_validate_srupp)
def build_srupp(*, model, settings: RecurrenceSettings, layer_idx: int) -> nn.Module:
    return _block(model, settings, layer_idx, attention=True)
