"""Routing metrics, detached: for logs and reports, never optimised."""

from __future__ import annotations

import torch

from condcomp.routing.types import count_per_value


@torch.no_grad()
def routing_metrics(probs: torch.Tensor, token_index: torch.Tensor, group_sizes: torch.Tensor,
                    real: torch.Tensor, dropped: torch.Tensor) -> dict[str, torch.Tensor]:
    """probs [n, e]; token_index [a]; group_sizes [e]; real, dropped [n] bool."""
    n, e = probs.shape
    n_real = real.sum().clamp(min=1)
    per_token = count_per_value(token_index, n)  # [n] experts that processed each token
    entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1)
    return {
        "tokens_per_expert": group_sizes.detach().clone(),
        "fraction_dropped": dropped.sum() / n_real,
        "experts_per_token_hist": count_per_value(per_token.clamp(max=e), e + 1, weights=real),
        "router_entropy": (entropy * real).sum() / n_real,
    }
