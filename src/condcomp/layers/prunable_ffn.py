"""A feed-forward layer whose hidden channels can be switched off per sequence, and gathered into a
compact dense FFN once the choice is fixed (input-conditioned pruning; static pruning).

``PrunableFeedForward`` has the parameters of ``FeedForward`` under the same names, so a dense
model's (or a pretrained decoder's) weights load unchanged. Training multiplies the hidden
activations by a channel mask (soft weights in [0, 1], or a sampled L0 gate); inference never
multiplies by a mask: ``compact(mask)`` returns a plain ``FeedForward`` holding only the kept rows of
``up`` (gate and up rows for SwiGLU) and columns of ``down``, which the model then runs for the
prompt and every generated token.
"""

from __future__ import annotations

import torch

from condcomp.layers.feedforward import FeedForward
from condcomp.layers.info import LayerInfo
from condcomp.routing.channel_mask import at_least_one


class PrunableFeedForward(FeedForward):
    """x: [b, t, d_model] -> (y, LayerInfo()). ``channel_mask``: None (dense), or [b, d_ff] (one mask
    per sequence) or [d_ff] (one for all), float weights or bool, multiplying the hidden channels."""

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                channel_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerInfo]:
        if channel_mask is None:
            return super().forward(x, padding_mask)
        h = self.hidden(x)
        m = channel_mask.to(h.dtype)
        h = h * (m[:, None, :] if m.dim() == 2 else m)
        return self.dropout(self.down(h)), LayerInfo()

    @property
    def d_ff(self) -> int:
        return self.down.in_features

    @torch.no_grad()
    def compact(self, keep: torch.Tensor, *, where: str = "a layer") -> FeedForward:
        """A dense FFN of only the kept channels (keep: bool [d_ff]; one kept at least, with a
        warning). Its output equals ``forward(x, channel_mask=keep)`` up to float rounding order."""
        keep = at_least_one(keep.bool().reshape(1, -1), where=where)[0]
        idx = keep.nonzero().squeeze(-1)
        d_model = self.up.in_features
        small = FeedForward(d_model=d_model, d_ff=int(idx.numel()), activation=self.activation)
        small = small.to(device=self.up.weight.device, dtype=self.up.weight.dtype)
        up, down = self.channel_weights(idx)
        small.up.weight.copy_(up)
        small.down.weight.copy_(down)
        return small.eval()
