"""The one place tokens move by index: gather into per-group runs, run each group once, scatter back.

Fast path: one ``index_select`` for all groups, one call per non-empty group on a contiguous slice,
one ``index_add``. No one-hot dispatch tensors, no capacity padding: compute is spent only on the
assignments the router made.
"""

from __future__ import annotations

from typing import Callable

import torch

from condcomp.routing.types import Routing

GroupFn = Callable[[int, torch.Tensor], torch.Tensor]
"""(group index, x_group [m, d_in]) -> y_group [m, d_out]."""


def dispatch(x: torch.Tensor, routing: Routing, group_fn: GroupFn, d_out: int | None = None) -> torch.Tensor:
    """y[i] = sum over assignments (i, g, w) of w * group_fn(g, x[i]).

    x: [n, d_in] flattened tokens. Returns [n, d_out] (zeros for unassigned tokens), dtype of the
    group outputs.
    """
    if x.shape[0] != routing.num_tokens:
        raise ValueError(f"x has {x.shape[0]} tokens but the routing was made for {routing.num_tokens}")
    xs = x.index_select(0, routing.token_index)
    outs = [group_fn(g, chunk) for g, chunk in enumerate(xs.split(routing.group_sizes.tolist())) if chunk.shape[0]]
    if not outs:
        return x.new_zeros(x.shape[0], d_out or x.shape[1])
    ys = torch.cat(outs) if len(outs) > 1 else outs[0]
    return WeightedScatter.apply(ys, routing.combine_weights, routing.token_index, x.shape[0])


def weighted_scatter_reference(ys: torch.Tensor, weights: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """out[index[a]] += weights[a] * ys[a], with plain autograd ops (keeps both ys and ys*w alive)."""
    scaled = ys * weights.to(ys.dtype)[:, None]
    return scaled.new_zeros(n, ys.shape[1]).index_add(0, index, scaled)


class WeightedScatter(torch.autograd.Function):
    """out [n, d] = scatter-add over assignments a of weights[a] * ys[a] into row index[a].

    Same result as ``weighted_scatter_reference``, but saves only ys (not also the weighted copy that
    index_add would keep), one [assignments, d] tensor less per MoE layer in training.
    """

    @staticmethod
    def forward(ctx, ys, weights, index, n):
        ctx.save_for_backward(ys, weights, index)
        out = ys.new_zeros(n, ys.shape[1])
        return out.index_add_(0, index, ys * weights.to(ys.dtype)[:, None])

    @staticmethod
    def backward(ctx, grad_out):
        ys, weights, index = ctx.saved_tensors
        g = grad_out.index_select(0, index)  # [a, d]
        grad_ys = g * weights.to(g.dtype)[:, None] if ctx.needs_input_grad[0] else None
        grad_w = (g * ys).sum(-1).to(weights.dtype) if ctx.needs_input_grad[1] else None
        return grad_ys, grad_w, None, None


def dispatch_reference(x: torch.Tensor, routing: Routing, group_fn: GroupFn) -> torch.Tensor:
    """The same sum, one assignment at a time: slow and obviously right (tests only)."""
    groups = routing.group_of_assignment().tolist()
    rows = [torch.zeros_like(x[0]) for _ in range(x.shape[0])]
    for a, (tok, g) in enumerate(zip(routing.token_index.tolist(), groups)):
        y = group_fn(g, x[tok : tok + 1])[0]
        rows[tok] = rows[tok] + routing.combine_weights[a].to(y.dtype) * y
    return torch.stack(rows)
