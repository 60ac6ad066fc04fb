"""A bank of independent feed-forward experts stored as stacked weights."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from condcomp.layers.feedforward import ACTIVATIONS


class Experts(nn.Module):
    """e feed-forward experts. ``forward(g, x [m, d_model]) -> [m, d_model]`` runs expert g.

    up:   [e, d_model, d_ff] (GELU) or [e, d_model, 2*d_ff] (SwiGLU: gate and up fused).
    down: [e, d_ff, d_model].
    """

    def __init__(self, *, num_experts: int, d_model: int, d_ff: int, activation: str = "gelu"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.activation = activation
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        width = 2 * d_ff if activation == "swiglu" else d_ff
        self.up = nn.Parameter(torch.empty(num_experts, d_model, width))
        self.down = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        self.reset_parameters()

    @classmethod
    def from_weights(cls, up: torch.Tensor, down: torch.Tensor, *, activation: str) -> "Experts":
        """Experts holding the given weights (copied), e.g. a slice of a bigger bank for expert
        parallelism. up: [e, d_model, width], down: [e, d_ff, d_model]. Uses no random numbers."""
        with torch.device("meta"):
            experts = cls(num_experts=up.shape[0], d_model=up.shape[1], d_ff=down.shape[1], activation=activation)
        experts.up = nn.Parameter(up.detach().clone(), requires_grad=up.requires_grad)
        experts.down = nn.Parameter(down.detach().clone(), requires_grad=down.requires_grad)
        return experts

    def reset_parameters(self) -> None:
        # Same scale as nn.Linear's default for each expert.
        nn.init.uniform_(self.up, -1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_model))
        nn.init.uniform_(self.down, -1 / math.sqrt(self.d_ff), 1 / math.sqrt(self.d_ff))

    def forward(self, g: int, x: torch.Tensor) -> torch.Tensor:
        return self._run(x, self.up[g], self.down[g])

    def _run(self, x: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        h = x @ up
        if self.activation == "swiglu":
            gate, up_part = h.chunk(2, dim=-1)
            h = F.silu(gate) * up_part
        else:
            h = F.gelu(h)
        return h @ down

    def groups(self):
        """A group function ``(g, x) -> expert g of x`` for one dispatch, with every expert's weights
        split off once (``unbind``). Indexing ``self.up[g]`` per expert instead makes each expert's
        backward zero-fill and add a gradient the size of the whole bank: e times the traffic, 14 ms
        of a 42 ms EC-DiT step (benchmarks.md, "DiT"). Outputs and gradients are the same."""
        ups, downs = self.up.unbind(0), self.down.unbind(0)
        return lambda g, x: self._run(x, ups[g], downs[g])
