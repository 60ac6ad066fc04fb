"""Mixture-of-depths (Raposo et al., 2024): a whole block runs on the top fraction of each sequence's tokens.

    model: {block: mod, mod: {capacity: 0.125, every: 2, causal_scheme: aux_loss}}
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from condcomp import registry
from condcomp.layers.selected_block import MixtureOfDepths
from condcomp.routing import TokenSelectRouter
from condcomp.settings import Settings, setting
from condcomp.techniques.dense import transformer_block


@dataclass
class MoDSettings(Settings):
    """Settings of ``block: mod`` (section ``model.mod``)."""

    capacity: float = setting(0.125, gt=0.0, le=1.0, help="fraction of each sequence's tokens the block computes")
    every: int = setting(2, ge=1, help="layer i is MoD when (i + 1) % every == 0; others dense (the paper: 2)")
    causal_scheme: str = setting("aux_loss", choices=("aux_loss", "predictor"),
                                 help="how inference decides causally: router logit > 0, or a stop-gradient predictor")


@registry.register("block", "mod", settings=MoDSettings, section="mod",
                   summary="mixture-of-depths: the block runs on the top tokens of each sequence (training top-k "
                           "reads the sequence; inference decides causally)",
                   aux_loss_weights={"router_bce": 0.1, "predictor_bce": 1.0})
def build(*, model, settings: MoDSettings, layer_idx: int) -> nn.Module:
    """Mixture-of-depths on every ``every``-th layer, dense blocks between."""
    block = transformer_block(model=model, layer_idx=layer_idx)
    if (layer_idx + 1) % settings.every:
        return block
    router = TokenSelectRouter(d_model=model.d_model, capacity=settings.capacity, weighting="sigmoid",
                               causal_scheme=settings.causal_scheme)
    return MixtureOfDepths(block, router=router)


registry.register_claim(
    "mod.equal_flops", statement="{variant} ends at or below {baseline} at equal training FLOPs",
    paper="Raposo et al., 2024: MoD matches the isoFLOP-optimal baseline while each step is ~66% faster",
    test="lower_loss", view="flops")
