"""Expert-parallel dispatch: the same sum as ``dispatch``, with the groups (experts) spread over ranks.

Each rank routes its own tokens, then two all-to-alls move them: out to the ranks that own the chosen
experts and, after the experts ran, back home, where the usual weighted scatter combines them. Splits
are uneven (they are whatever the router decided) and gradients flow back through both exchanges, so
``dispatch_expert_parallel`` is a drop-in twin of ``dispatch`` whose reference is ``dispatch`` itself
run with all experts in one process (tests/test_distributed.py checks outputs and gradients).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as fc

from condcomp.dispatch.grouped import GroupFn, WeightedScatter
from condcomp.routing.types import Routing


@dataclass(frozen=True)
class ExpertPlacement:
    """Which experts this rank holds: the contiguous block ``[first, first + num_local)`` of
    ``num_experts``, one block per rank of ``group`` (rank i of the group holds block i)."""

    group: dist.ProcessGroup
    group_rank: int
    group_size: int
    num_experts: int

    @property
    def num_local(self) -> int:
        return self.num_experts // self.group_size

    @property
    def first(self) -> int:
        return self.group_rank * self.num_local


def exchange(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup) -> torch.Tensor:
    """All-to-all of rows with uneven splits, differentiable (backward is the reverse exchange).

    x: [sum(in_splits), d]; row block i goes to rank i of ``group``. Returns [sum(out_splits), d],
    the blocks received, in source-rank order.
    """
    y = fc.all_to_all_single_autograd(x.contiguous(), out_splits, in_splits, group)
    return fc.wait_tensor(y) if isinstance(y, fc.AsyncCollectiveTensor) else y


def dispatch_expert_parallel(x: torch.Tensor, routing: Routing, local_fn: GroupFn,
                             placement: ExpertPlacement) -> torch.Tensor:
    """y[i] = sum over assignments (i, g, w) of w * expert_g(x[i]), expert g living on rank
    g // num_local of the group, where it is ``local_fn(g - first, rows)``.

    x: [n, d] this rank's flattened tokens; routing over all ``num_experts`` experts. Returns [n, d].
    Every rank of the group must call this together (it is a collective), in training and in eval.
    """
    if x.shape[0] != routing.num_tokens:
        raise ValueError(f"x has {x.shape[0]} tokens but the routing was made for {routing.num_tokens}")
    if routing.num_groups != placement.num_experts:
        raise ValueError(f"routing has {routing.num_groups} groups but the placement spreads "
                         f"{placement.num_experts} experts")
    p, e_local = placement.group_size, placement.num_local
    counts = routing.group_sizes.to(torch.int64)  # [E] assignments per global expert, from this rank
    # counts_in[q * e_local + j]: rows rank q sends to my local expert j (a fixed-size, equal-split exchange).
    counts_in = torch.empty_like(counts)
    dist.all_to_all_single(counts_in, counts, group=placement.group)
    counts_in = counts_in.view(p, e_local)
    send = counts.view(p, e_local).sum(1).tolist()
    recv = counts_in.sum(1).tolist()

    xs = x.index_select(0, routing.token_index)  # [a, d], sorted by global expert = by owner rank
    received = exchange(xs, recv, send, placement.group)  # [r, d], by source rank, then local expert
    # Regroup the received rows expert-major so each local expert runs once on a contiguous slice.
    expert_of_row = torch.repeat_interleave(torch.arange(e_local, device=x.device).repeat(p), counts_in.reshape(-1))
    order = torch.argsort(expert_of_row, stable=True)
    grouped = received.index_select(0, order)
    sizes = counts_in.sum(0).tolist()
    outs = [local_fn(j, chunk) for j, chunk in enumerate(grouped.split(sizes)) if chunk.shape[0]]
    if not outs:
        # Nothing to compute here; still produce a graph-connected (empty) result so this rank takes
        # part in the backward exchange the other ranks will start.
        outs = [local_fn(0, grouped)]
    ys_grouped = torch.cat(outs) if len(outs) > 1 else outs[0]
    ys_received = ys_grouped.index_select(0, torch.argsort(order))  # back to source-rank order
    ys = exchange(ys_received, send, recv, placement.group)  # [a, d], this rank's assignments again
    return WeightedScatter.apply(ys, routing.combine_weights, routing.token_index, x.shape[0])
