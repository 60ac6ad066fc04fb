"""Routing metrics, detached: for logs and reports, never optimised."""

from __future__ import annotations

import torch


@torch.no_grad()
def routing_metrics(probs: torch.Tensor, token_index: torch.Tensor, group_sizes: torch.Tensor,
                    real: torch.Tensor, dropped: torch.Tensor) -> dict[str, torch.Tensor]:
    """probs [n, e]; token_index [a]; group_sizes [e]; real, dropped [n] bool."""
    n, e = probs.shape
    n_real = real.sum().clamp(min=1)
    per_token = torch.bincount(token_index, minlength=n)[real]  # experts that processed each real token
    entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1)
    return {
        "tokens_per_expert": group_sizes.detach().clone(),
        "fraction_dropped": dropped.sum() / n_real,
        "experts_per_token_hist": torch.bincount(per_token, minlength=e + 1)[: e + 1],
        "router_entropy": (entropy * real).sum() / n_real,
    }
