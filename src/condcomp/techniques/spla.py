"""Long-context attention: SPLA (exact attention on the chosen key blocks, linear attention on the
rest), its block-sparse baseline and pure linear attention — one switch apart, one settings section.

    model: {attention: spla, spla: {block: 64, top_k: 8}}
    model: {attention: block_sparse}     # first-order (mean-key) choice, no residual
    model: {attention: linear}           # causal linear attention, phi = elu + 1

All three keep ``Attention``'s projections, so a dense model's weights load into them unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from condcomp import registry
from condcomp.layers.sparse_linear_attention import RESIDUALS, SELECTIONS, SparseLinearAttention
from condcomp.settings import ConfigError, Settings, setting


@dataclass
class SPLASettings(Settings):
    """Settings of ``attention: spla | block_sparse | linear`` (section ``model.spla``)."""

    block: int = setting(64, ge=1, le=65536, help="key/query block size B (the length is padded up to a multiple)")
    top_k: int = setting(8, ge=0, le=65536, help="completed past blocks each query block reads exactly "
                                                  "(more than there are: all of them)")
    selection: str | None = setting(None, choices=tuple(SELECTIONS),
                                    help="block score; default second_order for spla, first_order for block_sparse")
    residual: str | None = setting(None, choices=RESIDUALS,
                                   help="the unselected blocks; default linear for spla, none for block_sparse")
    recompute: bool = setting(False, help="training: gather the chosen blocks again in the backward instead of "
                                          "keeping them (less memory, more time)")


def _validate(model) -> None:
    if model.block == "mod":
        raise ConfigError(f"attention: {model.attention} reads whole sequences in blocks and cannot sit inside "
                          "block: mod (which runs attention on the routed tokens only); use attention: causal there")
    if model.dropout:
        raise ConfigError(f"dropout: attention: {model.attention} has no attention dropout; set dropout: 0")


def _build(model, settings: SPLASettings, *, selection: str, residual: str, mode: str = "sparse") -> nn.Module:
    return SparseLinearAttention(
        d_model=model.d_model, n_heads=model.n_heads, max_len=model.seq_len, block=settings.block,
        top_k=settings.top_k, selection=settings.selection or selection, residual=settings.residual or residual,
        mode=mode, recompute=settings.recompute, rope_base=model.rope_base, n_kv_heads=model.n_kv_heads, head_dim=model.head_dim,
        qkv_bias=model.qkv_bias, out_bias=model.out_bias, rope=model.rope_scaling.rotary_kwargs())


@registry.register("attention", "spla", settings=SPLASettings, section="spla", validate=_validate,
                   summary="SPLA: exact attention on the top-k past key blocks (2nd-order score), linear on the rest")
def build_spla(*, model, settings: SPLASettings, layer_idx: int) -> nn.Module:
    return _build(model, settings, selection="second_order", residual="linear")


@registry.register("attention", "block_sparse", settings=SPLASettings, section="spla", validate=_validate,
                   summary="block-sparse attention: the top-k past key blocks by mean key, nothing for the rest")
def build_block_sparse(*, model, settings: SPLASettings, layer_idx: int) -> nn.Module:
    return _build(model, settings, selection="first_order", residual="none")


@registry.register("attention", "linear", settings=SPLASettings, section="spla", validate=_validate,
                   summary="causal linear attention (phi = elu + 1), chunked by spla.block")
def build_linear(*, model, settings: SPLASettings, layer_idx: int) -> nn.Module:
    return _build(model, settings, selection="second_order", residual="none", mode="linear")
