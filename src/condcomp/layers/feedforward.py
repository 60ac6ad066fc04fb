"""Position-wise feed-forward networks: SwiGLU (Shazeer, 2020) and GELU."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from condcomp.layers.info import LayerInfo

ACTIVATIONS = ("swiglu", "gelu")


class FeedForward(nn.Module):
    """x: [..., d_model] -> (y [..., d_model], LayerInfo()).

    swiglu: down(silu(x W_gate) * (x W_up)), gate and up fused in one [d_model, 2*d_ff] matmul.
    gelu:   down(gelu(x W_up)).
    """

    def __init__(self, *, d_model: int, d_ff: int, activation: str = "swiglu", dropout: float = 0.0):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        width = 2 * d_ff if activation == "swiglu" else d_ff
        self.up = nn.Linear(d_model, width, bias=False)
        self.down = nn.Linear(d_ff, d_model, bias=False)
        self.dropout = nn.Dropout(dropout)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The activated hidden channels: [..., d_model] -> [..., d_ff]."""
        h = self.up(x)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            return F.silu(gate) * up
        return F.gelu(h)

    def channel_weights(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights of hidden channels ``idx`` [k] alone: (up [width(k), d_model] — gate and up rows
        for SwiGLU —, down [d_model, k]), copies, for an FFN of just those channels."""
        d_ff = self.down.in_features
        rows = torch.cat([idx, idx + d_ff]) if self.activation == "swiglu" else idx
        return self.up.weight[rows].clone(), self.down.weight[:, idx].clone()

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerInfo]:
        """padding_mask is accepted for a uniform FFN interface; a dense FFN treats tokens independently."""
        return self.dropout(self.down(self.hidden(x))), LayerInfo()
