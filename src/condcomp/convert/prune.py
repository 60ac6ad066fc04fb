"""Structured FFN pruning that physically removes channels: a dense Transformer and one channel mask
per layer (the same kept count in every layer) -> a smaller dense Transformer whose FFNs hold only
the kept rows of ``up`` and columns of ``down``. It is an ordinary condcomp model (``d_ff`` = the
kept count): it saves, loads, exports and decodes like any other, at the speed of its size.

The masks come from any static method: ``magnitude_masks`` (the trivial baseline: |up rows| x
|down column|), or an L0 run's ``HardConcreteGates.deterministic_mask``.
"""

from __future__ import annotations

import torch

from condcomp.convert.coda import ConvertError
from condcomp.routing.channel_mask import hard_channel_mask, kept_channels, magnitude_scores


class PruneError(ConvertError):
    """The model or masks cannot be pruned as asked; the message says why."""


def _dense_ffns(model) -> list:
    from condcomp.layers.feedforward import FeedForward

    if model.cfg.ffn not in ("swiglu", "gelu") or model.cfg.block != "transformer":
        raise PruneError(f"channel pruning needs a dense model (ffn: swiglu or gelu, block: transformer); this one has "
                         f"ffn: {model.cfg.ffn}, block: {model.cfg.block}")
    ffns = [blk.ffn for blk in model.blocks]
    if not all(type(f) is FeedForward for f in ffns):
        raise PruneError("channel pruning needs plain FeedForward layers in every block")
    return ffns


def magnitude_masks(model, sparsity: float) -> list[torch.Tensor]:
    """Per layer, the channels with the largest |up rows| x |down column|: bool [d_ff] each, the
    same kept count everywhere."""
    ffns = _dense_ffns(model)
    keep = kept_channels(model.cfg.ffn_hidden, sparsity)
    return [hard_channel_mask(magnitude_scores(f.up.weight.detach(), f.down.weight.detach(), f.activation), keep)
            for f in ffns]


@torch.no_grad()
def prune_ffn_channels(model, masks: list[torch.Tensor]):
    """A new dense Transformer with each layer's FFN cut to its mask's channels (masks: one bool
    [d_ff] per layer, all keeping the same count). Its output equals ``model`` with the pruned
    channels' activations set to zero. The original is left unchanged."""
    from condcomp.models import Transformer

    ffns = _dense_ffns(model)
    d_ff = model.cfg.ffn_hidden
    if len(masks) != len(ffns):
        raise PruneError(f"got {len(masks)} masks for {len(ffns)} layers; give one per layer")
    counts = {int(m.sum()) for m in masks}
    if any(m.shape != (d_ff,) for m in masks):
        raise PruneError(f"each mask must be bool [{d_ff}] (the model's d_ff)")
    if len(counts) != 1 or 0 in counts:
        raise PruneError(f"every layer must keep the same number (at least 1) of channels to make one dense model; "
                         f"got kept counts {sorted(counts)}")
    kept = counts.pop()
    cfg = type(model.cfg).from_dict({**model.cfg.to_dict(), "d_ff": kept})
    small = Transformer(cfg).to(dtype=next(model.parameters()).dtype)
    state = model.state_dict()
    for i, (ffn, mask) in enumerate(zip(ffns, masks)):
        state[f"blocks.{i}.ffn.up.weight"], state[f"blocks.{i}.ffn.down.weight"] = \
            ffn.channel_weights(mask.bool().nonzero().squeeze(-1))
    small.load_state_dict(state)
    return small.train(model.training)
