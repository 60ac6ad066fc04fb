"""Auxiliary router losses. Padded tokens never count."""

from __future__ import annotations

import torch


def load_balance_loss(probs: torch.Tensor, expert_index: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """Switch/GShard balance loss e * sum_j f_j * P_j.

    probs:        [n, e] router softmax.
    expert_index: [n, k] chosen experts (before capacity).
    real:         [n] bool, False for padding.
    f_j = fraction of real tokens' choices that go to j; P_j = mean router probability of j over real
    tokens. Equals 1 for a perfectly uniform router.
    """
    e = probs.shape[-1]
    w = real.to(probs.dtype)
    n_real = w.sum().clamp(min=1)
    chosen = torch.zeros_like(probs).scatter_(1, expert_index, 1.0)  # [n, e] 0/1
    f = (chosen * w[:, None]).sum(0) / (n_real * expert_index.shape[1])
    p = (probs * w[:, None]).sum(0) / n_real
    return e * (f * p).sum()


def router_z_loss(logits: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """ST-MoE z-loss: mean over real tokens of logsumexp(logits)^2. logits [n, e], real [n] bool."""
    z = torch.logsumexp(logits, dim=-1) ** 2
    w = real.to(z.dtype)
    return (z * w).sum() / w.sum().clamp(min=1)
