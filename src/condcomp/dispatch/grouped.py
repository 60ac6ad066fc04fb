"""The one place tokens move by index: gather into per-group runs, run each group once, scatter back.

Fast path: one ``index_select`` for all groups, one call per non-empty group on a contiguous slice,
one ``index_add``. No one-hot dispatch tensors, no capacity padding: compute is spent only on the
assignments the router made.

A group function that can run all groups in one call (``GroupedFn``: the experts) does so where it
pays, and then the group sizes are never read on the host, so dispatch never waits for the device:
- every group the same size (``Routing.group_size``: expert choice without padding): one batched
  matmul per weight, on any device and dtype;
- on CUDA, varying sizes: PyTorch's grouped GEMM (bf16; offsets stay on the device).
Otherwise the per-group loop, which needs the sizes on the host (one synchronisation): the path on
CPU, where it is about as fast as the grouped GEMM (docs/benchmarks.md), and the fallback wherever
the grouped kernel refuses the operands.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

from condcomp.routing.types import Routing

GroupFn = Callable[[int, torch.Tensor], torch.Tensor]
"""(group index, x_group [m, d_in]) -> y_group [m, d_out]."""


class GroupedFn(Protocol):
    """A GroupFn that can also run every group in one call."""

    def __call__(self, g: int, x: torch.Tensor) -> torch.Tensor: ...

    def grouped(self, xs: torch.Tensor, group_sizes: torch.Tensor) -> torch.Tensor | None:
        """xs [a, d_in], rows sorted by group (group_sizes [g] on xs's device) -> [a, d_out], or None
        where no grouped kernel takes these operands."""

    def batched(self, xs: torch.Tensor) -> torch.Tensor:
        """xs [g, m, d_in]: m rows for each group -> [g, m, d_out]."""


GROUPED = "auto"
"""When dispatch runs all groups in one call: "auto" (batched when every group has the same size;
grouped GEMM on CUDA), "always" (the grouped GEMM on any device) or "never" (the per-group loop, the
reference: tests and benchmarks)."""


def use_grouped(x: torch.Tensor, group_fn) -> bool:
    if not hasattr(group_fn, "grouped") or GROUPED == "never":
        return False
    return GROUPED == "always" or x.device.type == "cuda"


def dispatch(x: torch.Tensor, routing: Routing, group_fn: GroupFn, d_out: int | None = None) -> torch.Tensor:
    """y[i] = sum over assignments (i, g, w) of w * group_fn(g, x[i]).

    x: [n, d_in] flattened tokens. Returns [n, d_out] (zeros for unassigned tokens), dtype of the
    group outputs.
    """
    if x.shape[0] != routing.num_tokens:
        raise ValueError(f"x has {x.shape[0]} tokens but the routing was made for {routing.num_tokens}")
    xs = x.index_select(0, routing.token_index)
    ys = None
    if GROUPED != "never" and routing.group_size is not None and hasattr(group_fn, "batched"):
        ys = group_fn.batched(xs.view(routing.num_groups, routing.group_size, xs.shape[1])).flatten(0, 1)
    elif use_grouped(x, group_fn):
        ys = group_fn.grouped(xs, routing.group_sizes)
    if ys is not None:
        return WeightedScatter.apply(ys, routing.combine_weights, routing.token_index, x.shape[0])
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
