"""A naive mixture-of-experts, one token and one expert at a time, written from the papers'
definitions without condcomp's routing or dispatch code. Tests compare the fast path against it."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def expert_ffn(experts, j: int, x: torch.Tensor) -> torch.Tensor:
    """Expert j on one token x [d]."""
    h = x @ experts.up[j]
    if experts.activation == "swiglu":
        g, u = h.chunk(2)
        h = F.silu(g) * u
    else:
        h = F.gelu(h)
    return h @ experts.down[j]


def reference_top_k(moe, x: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
    """x [b, t, d]. Overflow priority as the router's ``priority`` says:
    position_major: position by position (across the batch), each token's choices in rank order;
        capacity counts every token slot, padding included.
    rank_major (GShard): rank 0 of every token (position by position across the batch) first;
        capacity counts real tokens only."""
    r = moe.router
    b, t, d = x.shape
    real = torch.ones(b, t, dtype=torch.bool) if real is None else real
    probs = {}
    for bi in range(b):
        for ti in range(t):
            probs[bi, ti] = torch.softmax(x[bi, ti] @ r.gate.weight.t(), -1)
    counted = b * t if r.priority == "position_major" else int(real.sum())
    cap = math.inf if r.capacity_factor is None else math.ceil(r.capacity_factor * r.k * counted / r.num_experts)
    if r.priority == "position_major":
        order = [(rank, ti, bi) for ti in range(t) for bi in range(b) for rank in range(r.k)]
    else:
        order = [(rank, ti, bi) for rank in range(r.k) for ti in range(t) for bi in range(b)]
    load = [0] * r.num_experts
    out = [[torch.zeros(d, dtype=x.dtype) for _ in range(t)] for _ in range(b)]
    for rank, ti, bi in order:
        if not real[bi, ti]:
            continue
        p = probs[bi, ti]
        top_p, top_e = p.topk(r.k)
        gates = top_p / top_p.sum() if r.renormalize else top_p
        j = int(top_e[rank])
        if load[j] < cap:
            load[j] += 1
            out[bi][ti] = out[bi][ti] + gates[rank] * expert_ffn(moe.experts, j, x[bi, ti])
    return torch.stack([torch.stack(row) for row in out])


def reference_expert_choice_global(moe, x: torch.Tensor) -> torch.Tensor:
    """x [n, d]: each expert sorts all tokens by its score and takes the best c."""
    r = moe.router
    n, d = x.shape
    scores = torch.stack([torch.softmax(x[i] @ r.gate.weight.t(), -1) for i in range(n)])  # [n, e]
    c = min(n, math.ceil(r.capacity_factor * n / r.num_experts))
    out = [torch.zeros(d, dtype=x.dtype) for _ in range(n)]
    for j in range(r.num_experts):
        # Python's sort is stable: among equal scores the earlier token wins, as documented.
        ranked = sorted(range(n), key=lambda i: -float(scores[i, j].detach()))[:c]
        for i in ranked:
            out[i] = out[i] + scores[i, j] * expert_ffn(moe.experts, j, x[i])
    return torch.stack(out)
