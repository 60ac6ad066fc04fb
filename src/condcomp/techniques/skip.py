"""Learned per-token layer skipping (Learning to Skip, Zeng et al., 2023).

    model: {block: skip, skip: {target_rate: 0.5, every: 1}}
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from condcomp import registry
from condcomp.layers.selected_block import LayerSkip
from condcomp.routing import BinaryGate
from condcomp.settings import Settings, setting
from condcomp.techniques.dense import transformer_block


@dataclass
class SkipSettings(Settings):
    """Settings of ``block: skip`` (section ``model.skip``)."""

    target_rate: float = setting(0.5, gt=0.0, le=1.0, help="fraction of tokens that should run each skippable block")
    every: int = setting(1, ge=1, help="layer i is skippable when (i + 1) % every == 0")
    temperature: float = setting(1.0, gt=0.0, help="Gumbel-softmax temperature")


@registry.register("block", "skip", settings=SkipSettings, summary="per-token run/skip gate on the block",
                   aux_loss_weights={"skip_rate": 1.0})
def build(*, model, settings: SkipSettings, layer_idx: int) -> nn.Module:
    """Learned per-token skipping on every ``every``-th layer."""
    block = transformer_block(model=model, layer_idx=layer_idx)
    if (layer_idx + 1) % settings.every:
        return block
    gate = BinaryGate(d_model=model.d_model, target_rate=settings.target_rate, temperature=settings.temperature)
    return LayerSkip(block, router=gate)
