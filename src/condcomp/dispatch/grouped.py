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
the grouped kernel refuses the operands. A group function with ``looped`` (the experts) runs the
whole loop as one autograd node, without the concatenations of a per-group autograd graph.

Size classes (the loop; on CPU in reduced precision only, ``SIZE_CLASSES``): each group's run is
padded to its size class (``size_class``: at most 1/2**SIZE_CLASS_BITS more rows) with copies of
token 0 that carry weight 0. Group sizes change every step as routing changes, and every new matmul
shape costs resident memory that is never handed back: oneDNN, which runs CPU bf16 GEMMs, caches a
kernel (with its scratch space) per shape, and glibc's heap keeps holes of sizes the next step does
not ask for. (fp32 CPU GEMMs go to BLAS, which keeps nothing per shape; there an fp32 top-2 model's
RSS was the same with and without the classes, and the steps faster without.) With size classes the
shapes repeat (docs/benchmarks.md, "Resident memory"). The padded rows' outputs are multiplied by 0
and added to token 0, so the result and every gradient are those of the unpadded loop. Their FLOPs
are executed but are not the model's: while a trainer counts FLOPs they are reported as overhead
(``recompute.add_overhead_flops``), so a FLOPs budget charges a MoE only for its real assignments.
"""

from __future__ import annotations

from itertools import accumulate
from typing import Callable, Protocol

import torch

from condcomp import recompute
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

    def looped(self, xs: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        """The per-group loop in one call (one autograd node): xs [a, d_in], sizes[g] rows of group g."""


GROUPED = "auto"
"""When dispatch runs all groups in one call: "auto" (batched when every group has the same size;
grouped GEMM on CUDA), "always" (the grouped GEMM on any device) or "never" (the per-group loop, the
reference: tests and benchmarks)."""

FUSED_LOOP = True
"""Whether the per-group loop runs as the group function's ``looped`` (one autograd node, where it has
one: the experts' ``ExpertLoop``) instead of one autograd subgraph per group (the reference twin)."""


SIZE_CLASS_BITS = 4
"""Size classes per doubling of the group size, as a power of two: 4 -> 16 classes, padding < 1/16.
None turns size classes off (the loop runs the exact sizes)."""
SIZE_CLASS_MIN = 16
"""Groups are padded to a multiple of at least this many rows."""
SIZE_CLASSES = "auto"
"""Where the loop pads groups to size classes: "auto" (where a matmul keeps state per shape: reduced
precision on CPU, whose GEMMs run in oneDNN with a cached kernel and scratch space per shape, and any
other device; not fp32/fp64 on CPU, whose BLAS GEMMs keep nothing per shape, so pad rows would only
cost time: docs/benchmarks.md, "Resident memory"), "always" (tests) or "never"."""


def size_class(m: int) -> int:
    """The smallest size class >= m: a multiple of max(SIZE_CLASS_MIN, 2**(floor(log2 m) - BITS))."""
    if SIZE_CLASS_BITS is None or m == 0:
        return m
    step = max(SIZE_CLASS_MIN, 1 << max(0, m.bit_length() - 1 - SIZE_CLASS_BITS))
    return -(-m // step) * step


def _pays_to_pad(x: torch.Tensor) -> bool:
    """Whether the loop's GEMMs on x keep state per shape (``SIZE_CLASSES``)."""
    if SIZE_CLASSES != "auto":
        return SIZE_CLASSES == "always"
    if x.device.type != "cpu":
        return True
    dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
    return dtype not in (torch.float32, torch.float64)


def _pad_to_size_classes(x: torch.Tensor, routing: Routing, sizes: list[int]):
    """(padded sizes, token index [a'], combine weights [a']) with every group padded to its size class
    where that pays for x: pad rows index token 0 and weigh 0; real rows keep their order (and their
    weights' gradients). Returns sizes itself when nothing is padded."""
    fixed = routing.tokens_per_sequence is not None  # fixed-size selections repeat their shapes already
    padded = sizes if fixed or not _pays_to_pad(x) else [size_class(m) for m in sizes]
    if padded == sizes:
        return sizes, routing.token_index, routing.combine_weights
    device = routing.token_index.device
    shift = torch.tensor([p - r for p, r in zip(accumulate(padded, initial=0), accumulate(sizes, initial=0))][:-1],
                         device=device)  # how far each group's first row moves
    position = torch.arange(routing.token_index.numel(), device=device) + shift[routing.group_of_assignment()]
    total = sum(padded)
    index = routing.token_index.new_zeros(total).index_copy_(0, position, routing.token_index)
    weights = routing.combine_weights.new_zeros(total).index_copy(0, position, routing.combine_weights)
    return padded, index, weights


def _run_loop(group_fn, xs: torch.Tensor, sizes: list[int], exact: list[int]) -> torch.Tensor | None:
    """Every group on its run of xs (sizes[g] rows each; exact[g] of them real), concatenated: [a, d_out],
    or None when no group has rows.

    While a trainer counts FLOPs (``recompute.counting_overhead``), the padding rows' share is reported
    as overhead: each group's forward FLOPs are measured, and the pad rows' share of them, times 3 when
    a backward follows (twice the forward, as for the linear layers a group function is made of, given
    an input that needs its gradient, as a hidden state in training does), is what the model did not
    need.
    """
    if not xs.shape[0]:
        return None
    looped = getattr(group_fn, "looped", None) if FUSED_LOOP else None
    counting = sizes is not exact and recompute.counting_overhead()
    if looped is not None:  # one node: every row of every group costs the same FLOPs
        groups = [(lambda: looped(xs, sizes), sum(sizes), sum(exact))]
    else:
        groups = [(lambda g=g, chunk=chunk: group_fn(g, chunk), chunk.shape[0], m)
                  for g, (chunk, m) in enumerate(zip(xs.split(sizes), exact)) if chunk.shape[0]]
    if not counting:
        outs = [run() for run, _, _ in groups]
    else:
        from condcomp.flops import flop_counter

        passes = 3 if torch.is_grad_enabled() else 1
        outs, overhead = [], 0.0
        for run, rows, real in groups:
            with flop_counter() as counter:  # counts alongside the trainer's counter
                outs.append(run())
            overhead += passes * counter.get_total_flops() * (rows - real) / rows
        recompute.add_overhead_flops(overhead)
    return torch.cat(outs) if len(outs) > 1 else outs[0]


def use_grouped(x: torch.Tensor, group_fn) -> bool:
    if not hasattr(group_fn, "grouped") or GROUPED == "never":
        return False
    return GROUPED == "always" or x.device.type == "cuda"


def dispatch(x: torch.Tensor, routing: Routing, group_fn: GroupFn, d_out: int | None = None,
             into: torch.Tensor | None = None) -> torch.Tensor:
    """y[i] = sum over assignments (i, g, w) of w * group_fn(g, x[i]).

    x: [n, d_in] flattened tokens. Returns [n, d_out] (zeros for unassigned tokens), dtype of the
    group outputs. into: an [n, d_out] tensor to add y to, in place (a light FFN's or a shared
    expert's output, which no autograd node has saved): one pass over [n, d_out] instead of zeros
    plus a sum. Returns into then (or into + y where the dtypes differ).
    """
    if x.shape[0] != routing.num_tokens:
        raise ValueError(f"x has {x.shape[0]} tokens but the routing was made for {routing.num_tokens}")
    ys = None
    if GROUPED != "never" and routing.group_size is not None and hasattr(group_fn, "batched"):
        xs = x.index_select(0, routing.token_index)
        ys = group_fn.batched(xs.view(routing.num_groups, routing.group_size, xs.shape[1])).flatten(0, 1)
    elif use_grouped(x, group_fn):
        ys = group_fn.grouped(x.index_select(0, routing.token_index), routing.group_sizes)
    if ys is not None:
        return _scatter(ys, routing.combine_weights, routing.token_index, x.shape[0], into)
    exact = routing.group_sizes.tolist()
    sizes, index, weights = _pad_to_size_classes(x, routing, exact)
    ys = _run_loop(group_fn, x.index_select(0, index), sizes, exact)
    if ys is None:
        return into if into is not None else x.new_zeros(x.shape[0], d_out or x.shape[1])
    return _scatter(ys, weights, index, x.shape[0], into)


def _scatter(ys, weights, index, n, into):
    if into is not None and into.dtype != ys.dtype:
        return into + WeightedScatter.apply(ys, weights, index, n, None)
    return WeightedScatter.apply(ys, weights, index, n, into)


def weighted_scatter_reference(ys: torch.Tensor, weights: torch.Tensor, index: torch.Tensor, n: int) -> torch.Tensor:
    """out[index[a]] += weights[a] * ys[a], with plain autograd ops (keeps both ys and ys*w alive)."""
    scaled = ys * weights.to(ys.dtype)[:, None]
    return scaled.new_zeros(n, ys.shape[1]).index_add(0, index, scaled)


class WeightedScatter(torch.autograd.Function):
    """out [n, d] = scatter-add over assignments a of weights[a] * ys[a] into row index[a], added to
    ``into`` [n, d] in place where given (else to zeros).

    Same result as ``weighted_scatter_reference`` (+ into), but saves only ys (not also the weighted
    copy that index_add would keep), one [assignments, d] tensor less per MoE layer in training.
    """

    @staticmethod
    def forward(ctx, ys, weights, index, n, into=None):
        ctx.save_for_backward(ys, weights, index)
        if into is None:
            out = ys.new_zeros(n, ys.shape[1])
        else:
            ctx.mark_dirty(into)
            out = into
        return out.index_add_(0, index, ys * weights.to(ys.dtype)[:, None])

    @staticmethod
    def backward(ctx, grad_out):
        ys, weights, index = ctx.saved_tensors
        g = grad_out.index_select(0, index)  # [a, d]
        grad_w = (g * ys).sum(-1).to(weights.dtype) if ctx.needs_input_grad[1] else None
        grad_ys = g.mul_(weights.to(g.dtype)[:, None]) if ctx.needs_input_grad[0] else None  # g is ours
        grads = (grad_ys, grad_w, None, None)
        if len(ctx.needs_input_grad) > 4:  # called with into
            grads += (grad_out if ctx.needs_input_grad[4] else None,)
        return grads


def dispatch_reference(x: torch.Tensor, routing: Routing, group_fn: GroupFn) -> torch.Tensor:
    """The same sum, one assignment at a time: slow and obviously right (tests only)."""
    groups = routing.group_of_assignment().tolist()
    rows = [torch.zeros_like(x[0]) for _ in range(x.shape[0])]
    for a, (tok, g) in enumerate(zip(routing.token_index.tolist(), groups)):
        y = group_fn(g, x[tok : tok + 1])[0]
        rows[tok] = rows[tok] + routing.combine_weights[a].to(y.dtype) * y
    return torch.stack(rows)
