"""Token-choice top-k routing: Switch (k=1) and GShard (k=2)."""

from __future__ import annotations

import math

import torch
from torch import nn

from condcomp.routing.base import Router, RouterTokens
from condcomp.routing.losses import load_balance_loss, router_z_loss
from condcomp.routing.metrics import routing_metrics
from condcomp.routing.types import Routing, RoutingError, count_per_value

PRIORITIES = ("position_major", "rank_major")


class TopKRouter(Router):
    """Each token picks its k highest-probability experts.

    Capacity per expert = ceil(capacity_factor * k * tokens / experts); assignments past it are
    dropped (the token keeps only its residual path). ``capacity_factor=None`` is dropless.
    Which assignments an overflowing expert keeps is set by ``priority``:

    - "position_major" (default; decoders): position by position across the batch — every choice
      of the position-0 tokens, then position 1, ...; within a position, first choices before second
      choices. A token's slot depends only on tokens at its own or earlier positions, and the
      capacity counts every token slot of the input (padding included), so it cannot depend on how
      many real tokens come later either: causal, with or without capacity.
    - "rank_major" (GShard; encoders): every first choice, at every position, before any second
      choice, and the capacity counts real tokens only. HAZARD — whether an early token keeps its
      second choice then depends on later tokens' first choices: it reads the future. ``causal`` is
      False (unless dropless) and a decoder refuses to build with it.

    Args:
        d_model: input feature size.
        num_experts: number of experts (groups).
        k: experts per token (1 = Switch, 2 = GShard).
        capacity_factor: > 0, or None for dropless.
        renormalize: rescale the k gate values to sum to 1 (default: True when k > 1).
        gate_scale: multiply the gate values by this (> 0). With top-1 over E experts the softmax gate
            starts near 1/E and shrinks the expert's output; gate_scale = E starts it near 1 while the
            router keeps its gradient from the LM loss (renormalizing a single gate to p/p = 1 removes it).
        jitter: multiplicative input noise U(1-jitter, 1+jitter) in training (Switch); 0 = off.
        priority: "position_major" or "rank_major", as above.
    """

    aux_loss_names = ("load_balance", "z_loss")

    def __init__(self, *, d_model: int, num_experts: int, k: int = 1, capacity_factor: float | None = 1.25,
                 renormalize: bool | None = None, jitter: float = 0.0, priority: str = "position_major",
                 gate_scale: float = 1.0):
        super().__init__(d_model=d_model, jitter=jitter)
        if num_experts < 1:
            raise RoutingError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= k <= num_experts:
            raise RoutingError(f"k must be between 1 and num_experts={num_experts}, got {k}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise RoutingError(f"capacity_factor must be > 0, got {capacity_factor}; use None for dropless")
        if priority not in PRIORITIES:
            raise RoutingError(f"priority must be one of {PRIORITIES}, got {priority!r}")
        if not gate_scale > 0:
            raise RoutingError(f"gate_scale must be > 0, got {gate_scale}")
        self.num_experts, self.k = num_experts, k
        self.gate_scale = gate_scale
        self.capacity_factor = capacity_factor
        self.renormalize = (k > 1) if renormalize is None else renormalize
        self.priority = priority
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    @property
    def causal(self) -> bool:
        return self.priority == "position_major" or self.capacity_factor is None

    def capacity(self, tokens: int) -> int | None:
        """Slots per expert for ``tokens`` tokens (None: dropless)."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * self.k * tokens / self.num_experts)

    def select(self, logits: torch.Tensor, tokens: RouterTokens) -> Routing:
        real, order = tokens.real, tokens.order
        n, e, k = logits.shape[0], self.num_experts, self.k
        probs = logits.softmax(dim=-1)
        top_p, top_e = probs.topk(k, dim=-1)  # [n, k]
        gates = top_p / top_p.sum(-1, keepdim=True) if self.renormalize else top_p
        if self.gate_scale != 1.0:
            gates = gates * self.gate_scale

        # Assignments [k*n] listed in priority order; a stable sort by expert keeps that order
        # within each expert, so an assignment's slot is its rank among the expert's earlier ones.
        if self.priority == "rank_major":
            token_flat = order.repeat(k)
            expert_flat = top_e[order].t().reshape(-1)
            gate_flat = gates[order].t().reshape(-1)
            cap = self.capacity(int(real.sum()))
        else:
            token_flat = order.repeat_interleave(k)
            expert_flat = top_e[order].reshape(-1)
            gate_flat = gates[order].reshape(-1)
            cap = self.capacity(n)
        expert_key = torch.where(real[token_flat], expert_flat, e)  # padding sorts into a discarded bucket
        sorted_key, perm = torch.sort(expert_key, stable=True)
        counts = count_per_value(sorted_key, e + 1)[:e]
        starts = torch.cumsum(counts, 0) - counts
        valid = sorted_key < e
        slot = torch.arange(k * n, device=logits.device) - starts[sorted_key.clamp(max=e - 1)]
        keep = valid if cap is None else valid & (slot < cap)
        if cap is None and tokens.all_real:  # dropless, no padding: every assignment is kept
            token_index, combine = token_flat[perm], gate_flat[perm]  # (no boolean mask: nothing read back)
        else:
            token_index, combine = token_flat[perm][keep], gate_flat[perm][keep]
        group_sizes = counts if cap is None else counts.clamp(max=cap)

        # index_fill_ with a Python scalar, not ``served[token_index] = True``: the latter copies the
        # value from the host and makes a CUDA stream wait.
        served = torch.zeros(n, dtype=torch.bool, device=logits.device).index_fill_(0, token_index, True)
        dropped = real & ~served
        routing = Routing(
            token_index=token_index, group_sizes=group_sizes, combine_weights=combine, num_tokens=n,
            dropped=dropped,
            aux_losses={"load_balance": load_balance_loss(probs, top_e, real), "z_loss": router_z_loss(logits, real)},
        )
        routing.metrics = routing_metrics(probs, token_index, group_sizes, real, dropped)
        routing.metrics["fraction_assignments_dropped"] = (valid & ~keep).sum() / valid.sum().clamp(min=1)
        return routing
