"""Blocks that run only on the tokens a router selects: mixture-of-depths and learned layer skipping.

A wrapped block has the block interface of ``condcomp.layers.blocks``:
``block(x [b, t, d], padding_mask=None, positions=None, cache=None) -> (x + update, LayerInfo)``. The wrapper gathers each sequence's selected tokens in position order, runs the block
on them alone (so attention is among the selected tokens, at their original rotary positions), and
adds ``weight * update`` back; unselected tokens pass through unchanged and, in incremental
decoding, write nothing into the block's key/value cache.
"""

from __future__ import annotations

import torch
from torch import nn

from condcomp.dispatch.sequences import SequencePack, dispatch_sequences
from condcomp.layers.info import LayerInfo
from condcomp.layers.traits import RoutedParameters, count_parameters
from condcomp.routing import BinaryGate, Router, RoutingError, TokenSelectRouter


def _width(block: nn.Module, d_model: int | None) -> int:
    d_model = d_model if d_model is not None else getattr(block, "d_model", None)
    if d_model is None:
        raise ValueError(f"pass d_model=...: {type(block).__name__} has no d_model attribute to read it from")
    return d_model


class SelectedBlock(nn.Module):
    """A block run only on the tokens its one-group ``router`` selects (the base of MixtureOfDepths
    and LayerSkip; use it directly with any such Router)."""

    selects_tokens = True  # a step may select no token of the block

    def __init__(self, block: nn.Module, router: Router):
        super().__init__()
        if not isinstance(router, Router):
            raise RoutingError(f"router must be a Router (TokenSelectRouter, BinaryGate), got {type(router).__name__}")
        self.block = block
        self.router = router

    @property
    def causal(self) -> bool:
        return self.router.causal and bool(getattr(self.block, "causal", True))

    @property
    def causal_in_training(self) -> bool:
        return self.router.causal_in_training and bool(getattr(self.block, "causal_in_training", True))

    @property
    def supports_cache(self) -> bool:
        return bool(getattr(self.block, "supports_cache", False))

    @property
    def aux_loss_names(self) -> tuple[str, ...]:
        return self.router.aux_loss_names

    def routed_parameters(self) -> dict[str, RoutedParameters]:
        return {"router": RoutedParameters(count_parameters(self.block))}

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache=None) -> tuple[torch.Tensor, LayerInfo]:
        """x: [batch, seq, d]. Returns (y [batch, seq, d], LayerInfo with the router's losses/metrics
        under "router." and the inner block's under "block.")."""
        b, t, d = x.shape
        if positions is None:
            offset = cache.offset if cache is not None else 0
            positions = (offset + torch.arange(t, device=x.device)).expand(b, t)
        routing = self.router(x, padding_mask)
        info = LayerInfo().add("router", LayerInfo(routing.aux_losses, routing.metrics))
        flat_positions = positions.reshape(-1)

        def run(xs: torch.Tensor, pack: SequencePack) -> torch.Tensor:
            out, inner = self.block(xs, padding_mask=None if pack.all_valid else pack.valid,
                                    positions=flat_positions[pack.index], cache=cache)
            info.add("block", inner)
            return out - xs

        update = dispatch_sequences(x, routing, run)
        return x + update.view(b, t, d).to(x.dtype), info


class MixtureOfDepths(SelectedBlock):
    """Mixture-of-depths (Raposo et al., 2024): the whole block runs on the top ``capacity`` fraction
    of each sequence's tokens; x_i <- x_i + w_i * (block(X_sel)_i - x_i); the rest skip it.

        mod = MixtureOfDepths(block, capacity=0.125)    # decoder: causal by default
        y, info = mod(x)                                            # x: [batch, seq, 512]
        loss = lm_loss + 0.01 * info.aux_losses["router_bce"]

    Args:
        block: a block with the interface in this module's docstring (e.g. TransformerBlock).
        capacity: fraction of tokens computed, (0, 1].
        d_model: router input size; default: ``block.d_model``.
        weighting, causal_scheme: see ``TokenSelectRouter``. The defaults (sigmoid weights, router
            logit trained to predict top-k membership, thresholded at inference) are the causal form
            for decoders; encoders may use weighting="soft_top_k", causal_scheme=None.
        router: a ready TokenSelectRouter instead of building one.
    """

    def __init__(self, block: nn.Module, *, capacity: float = 0.125, d_model: int | None = None,
                 weighting: str = "sigmoid", causal_scheme: str | None = "aux_loss",
                 router: TokenSelectRouter | None = None):
        router = router or TokenSelectRouter(d_model=_width(block, d_model), capacity=capacity, weighting=weighting,
                                             causal_scheme=causal_scheme)
        super().__init__(block, router)


class LayerSkip(SelectedBlock):
    """Learned per-token layer skipping (Learning to Skip, Zeng et al., 2023): a binary gate per token decides
    whether the block runs on it (straight-through Gumbel-softmax in training, argmax at inference).
    Causal by construction. Aux loss "skip_rate" pulls the run rate toward ``target_rate``.

        skip = LayerSkip(block, target_rate=0.5)
        y, info = skip(x)
    """

    def __init__(self, block: nn.Module, *, target_rate: float = 0.5, d_model: int | None = None,
                 temperature: float = 1.0, router: BinaryGate | None = None):
        router = router or BinaryGate(d_model=_width(block, d_model), target_rate=target_rate, temperature=temperature)
        super().__init__(block, router)
