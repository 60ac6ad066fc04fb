"""Token-choice top-k routing: Switch (k=1) and GShard (k=2)."""

from __future__ import annotations

import math

import torch
from torch import nn

from condcomp.routing.losses import load_balance_loss, router_z_loss
from condcomp.routing.metrics import routing_metrics
from condcomp.routing.types import Routing, RoutingError, check_finite, flatten_tokens, router_dtype


class TopKRouter(nn.Module):
    """Each token picks its k highest-probability experts.

    Capacity per expert = ceil(capacity_factor * k * real_tokens / experts); assignments past it are
    dropped (the token keeps only its residual path). Priority when an expert overflows: all first
    choices before any second choice (GShard), and within a rank, earlier sequence positions first,
    taken position by position across the batch. Because of that order a token's drop decision
    depends only on tokens at its own or earlier positions, so this router is causal and safe in a
    decoder, with or without capacity. ``capacity_factor=None`` is dropless.

    Args:
        d_model: input feature size.
        num_experts: number of experts (groups).
        k: experts per token (1 = Switch, 2 = GShard).
        capacity_factor: > 0, or None for dropless.
        renormalize: rescale the k gate values to sum to 1 (default: True when k > 1).
        jitter: multiplicative input noise U(1-jitter, 1+jitter) in training (Switch); 0 = off.
    """

    causal = True

    def __init__(self, *, d_model: int, num_experts: int, k: int = 1, capacity_factor: float | None = 1.25,
                 renormalize: bool | None = None, jitter: float = 0.0):
        super().__init__()
        if num_experts < 1:
            raise RoutingError(f"num_experts must be >= 1, got {num_experts}")
        if not 1 <= k <= num_experts:
            raise RoutingError(f"k must be between 1 and num_experts={num_experts}, got {k}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise RoutingError(f"capacity_factor must be > 0, got {capacity_factor}; use None for dropless")
        if not 0 <= jitter < 1:
            raise RoutingError(f"jitter must be in [0, 1), got {jitter}")
        self.d_model, self.num_experts, self.k = d_model, num_experts, k
        self.capacity_factor = capacity_factor
        self.renormalize = (k > 1) if renormalize is None else renormalize
        self.jitter = jitter
        self.gate = nn.Linear(d_model, num_experts, bias=False)

    def capacity(self, real_tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * self.k * real_tokens / self.num_experts)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> Routing:
        """x: [batch, seq, d] or [n, d]; padding_mask: same leading shape, True = real token."""
        flat, real, order = flatten_tokens(x, padding_mask, self.d_model)
        n, e, k = flat.shape[0], self.num_experts, self.k
        # Routing decisions in fp32 even under bf16 autocast: top-k ties and softmax need the precision.
        with torch.autocast(flat.device.type, enabled=False):
            h = flat.to(router_dtype(flat))
            if self.training and self.jitter > 0:
                h = h * torch.empty_like(h).uniform_(1 - self.jitter, 1 + self.jitter)
            logits = h @ self.gate.weight.to(h.dtype).t()  # [n, e]
            check_finite(logits)
            probs = logits.softmax(dim=-1)
            top_p, top_e = probs.topk(k, dim=-1)  # [n, k]
            gates = top_p / top_p.sum(-1, keepdim=True) if self.renormalize else top_p

        # Assignments in priority order: rank-major, then position-major over tokens.
        token_flat = order.repeat(k)  # [k*n]
        expert_flat = top_e[order].t().reshape(-1)
        gate_flat = gates[order].t().reshape(-1)
        expert_key = torch.where(real[token_flat], expert_flat, e)  # padding sorts into a discarded bucket
        sorted_key, perm = torch.sort(expert_key, stable=True)
        counts = torch.bincount(sorted_key, minlength=e + 1)[:e]
        starts = torch.cumsum(counts, 0) - counts
        valid = sorted_key < e
        slot = torch.arange(k * n, device=x.device) - starts[sorted_key.clamp(max=e - 1)]
        cap = self.capacity(int(real.sum()))
        keep = valid if cap is None else valid & (slot < cap)
        token_index = token_flat[perm][keep]
        combine = gate_flat[perm][keep]
        group_sizes = counts if cap is None else counts.clamp(max=cap)

        served = torch.zeros(n, dtype=torch.bool, device=x.device)
        served[token_index] = True
        dropped = real & ~served
        routing = Routing(
            token_index=token_index, group_sizes=group_sizes, combine_weights=combine, num_tokens=n,
            dropped=dropped,
            aux_losses={"load_balance": load_balance_loss(probs, top_e, real), "z_loss": router_z_loss(logits, real)},
        )
        routing.metrics = routing_metrics(probs, token_index, group_sizes, real, dropped)
        routing.metrics["fraction_assignments_dropped"] = (valid & ~keep).sum() / valid.sum().clamp(min=1)
        return routing
