"""Soft-routed attention experts (BAM, Zhang et al., 2024): every token mixes all attention experts.

    model: {attention: experts, attention_experts: {num_experts: 4, shared_kv: false}}

Usually reached by merging branches (``condcomp bam``), which fills each expert from one branch.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from condcomp import registry
from condcomp.layers.attention_experts import AttentionExperts
from condcomp.settings import ConfigError, Settings, setting


@dataclass
class AttentionExpertsSettings(Settings):
    """Settings of ``attention: experts`` (section ``model.attention_experts``)."""

    num_experts: int = setting(4, ge=1, le=256, help="attention experts; every one runs for every token")
    shared_kv: bool = setting(False, help="one key/value projection for all experts (cheaper; BAM's KV-sharing variant)")


def _validate(model) -> None:
    if model.out_bias:
        raise ConfigError("out_bias: attention experts have no output bias (each expert would need its own); "
                          "set out_bias: false")


@registry.register("attention", "experts", settings=AttentionExpertsSettings, section="attention_experts",
                   summary="soft mixture of attention experts: every expert runs, per-token softmax gates (BAM)",
                   validate=_validate)
def build(*, model, settings: AttentionExpertsSettings, layer_idx: int) -> nn.Module:
    return AttentionExperts(d_model=model.d_model, n_heads=model.n_heads, num_experts=settings.num_experts,
                            max_len=model.seq_len, shared_kv=settings.shared_kv, rope_base=model.rope_base,
                            dropout=model.dropout, n_kv_heads=model.n_kv_heads, head_dim=model.head_dim,
                            qkv_bias=model.qkv_bias, rope=model.rope_scaling.rotary_kwargs())
