"""Soft top-k (CoLT5 / CoDA): differentiable weights in [0, 1] that sum to k.

Solves  max_w  s.w + eps * H(w)   s.t.  sum(w) = k,  0 <= w <= 1   (H = entropy)
by coordinate descent on the dual with epsilon scaling (CoLT5, Ainslie et al., 2023):

    repeat: a <- eps*ln(k) - eps*logsumexp((s + b) / eps);   b <- -relu(s + a)
    w = exp((s + a + b) / eps) = min(1, exp((s + a) / eps))

The backward does not unroll the iterations. At the solution, tokens with w < 1 ("free") satisfy
w_i = exp((s_i + a) / eps) and saturated ones stay at 1, and a moves to keep sum(w) = k. Implicit
differentiation then gives a softmax-like Jacobian restricted to the free tokens:

    dL/ds_j = (w_j / eps) * (g_j - sum_{i free} g_i w_i / sum_{i free} w_i)   for free j, else 0

so the backward saves only w: O(n) memory whatever the number of iterations.

Two forward solvers give the same w:
- ``method="sort"`` (default): the exact solution. Sort the scores; for each candidate count m of
  saturated tokens the free part fixes a in closed form, a = eps * (ln(k - m) - logsumexp(s_tail / eps));
  keep the m whose a is consistent. O(n log n), sums to k to rounding error.
- ``method="coordinate_descent"``: the paper's iterations. Measured on unit-variance scores (n=512,
  k=64): at eps=1 it converges in 20 steps; at eps=0.1 the sum is still off by 5.5 after 20 steps and
  by 0.2 after 50, which is why it is not the default.
"""

from __future__ import annotations

import math

import torch


def _solve(s: torch.Tensor, real: torch.Tensor, k: torch.Tensor, eps: float, iters: int, eps_init: float,
           eps_decay: float) -> torch.Tensor:
    """Coordinate descent; s [..., n] (any finite value where ~real), k [...] float > 0. Returns w."""
    neg_inf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
    s = torch.where(real, s, neg_inf)
    log_k = k.log()[..., None]
    b = torch.zeros_like(s)
    cur = max(eps_init, eps)
    a = None
    for _ in range(iters):
        a = cur * log_k - cur * torch.logsumexp((s + b) / cur, dim=-1, keepdim=True)
        b = -torch.relu(s + a)
        cur = max(cur * eps_decay, eps)
    # One last a at the target eps, then the closed form of w (exactly 1 where saturated).
    a = eps * log_k - eps * torch.logsumexp((s + b) / eps, dim=-1, keepdim=True)
    return torch.exp(torch.clamp(s + a, max=0.0) / eps)


def _solve_exact(s: torch.Tensor, real: torch.Tensor, k: torch.Tensor, eps: float) -> torch.Tensor:
    """Exact w by sorting; s [..., n], real [..., n] with at least one real entry and 0 < k < real count."""
    neg_inf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
    ss = torch.where(real, s, neg_inf).sort(dim=-1, descending=True).values  # real first, -inf last
    n = ss.shape[-1]
    # tail[m] = logsumexp(ss[m:] / eps): reverse cumulative logsumexp.
    tail = torch.logcumsumexp((ss / eps).flip(-1), dim=-1).flip(-1)
    m = torch.arange(n, dtype=s.dtype, device=s.device)
    room = (k[..., None] - m).clamp(min=torch.finfo(s.dtype).tiny)  # k - m saturated tokens' worth left
    a = eps * (room.log() - tail)  # [..., n]: the a that makes the tail sum to k - m
    # Consistent m: token m is not saturated (ss[m] + a <= 0) and token m-1 is (ss[m-1] + a >= 0).
    over = torch.relu(ss + a)
    prev = torch.cat([torch.full_like(ss[..., :1], float("inf")), ss[..., :-1]], dim=-1)
    under = torch.relu(-(prev + a))
    violation = torch.nan_to_num(over + under, nan=float("inf"), posinf=float("inf"))
    violation = torch.where(m < k[..., None], violation, torch.full_like(violation, float("inf")))
    best = violation.argmin(dim=-1, keepdim=True)
    a_star = a.gather(-1, best)
    return torch.exp(torch.clamp(s + a_star, max=0.0) / eps)


class _SoftTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s, real, k, eps, iters, eps_init, eps_decay, method):
        n_real = real.sum(-1)
        k_eff = torch.minimum(k, n_real.to(s.dtype))
        full = k_eff >= n_real  # every real token selected: w = 1 exactly (also rows with no real token)
        safe_k = torch.where(full, torch.ones_like(k_eff), k_eff)
        safe_real = real | full[..., None]  # keep logsumexp finite on rows handled by `full`
        if method == "sort":
            w = _solve_exact(s.detach(), safe_real, safe_k, eps)
        else:
            w = _solve(s.detach(), safe_real, safe_k, eps, iters, eps_init, eps_decay)
        w = torch.where(full[..., None], real.to(s.dtype), w)
        w = torch.where(real, w, torch.zeros_like(w))
        ctx.eps = eps
        ctx.save_for_backward(w, real)
        return w

    @staticmethod
    def backward(ctx, g):
        w, real = ctx.saved_tensors
        free = (w < 1) & real
        wf = torch.where(free, w, torch.zeros_like(w))
        total = wf.sum(-1, keepdim=True)
        mean_g = (g * wf).sum(-1, keepdim=True) / total.clamp(min=torch.finfo(w.dtype).tiny)
        grad = wf / ctx.eps * (g - mean_g)
        return grad, None, None, None, None, None, None, None


def soft_top_k(scores: torch.Tensor, k: float | torch.Tensor, *, eps: float = 0.1, iters: int = 20,
               eps_init: float = 4.0, eps_decay: float = 0.7, mask: torch.Tensor | None = None,
               method: str = "sort") -> torch.Tensor:
    """Soft top-k weights along the last axis.

    scores: [..., n] float. k: number (or [...] tensor) of tokens to select per row, > 0; rows with
    fewer real tokens than k select all of them (w = 1). mask: [..., n] bool, True = real; masked
    entries get w = 0 and no gradient. eps: target entropy temperature (smaller = closer to hard top-k,
    relative to the scale of the scores). method: "sort" (exact) or "coordinate_descent" (the
    paper's; iters steps, eps starting at eps_init and multiplied by eps_decay each step down to eps).

    Returns w: [..., n], dtype of scores, 0 <= w <= 1, sum(w) = min(k, real count) per row (up to the
    convergence of the iterations).
    """
    if eps <= 0 or iters < 1 or eps_init <= 0 or not 0 < eps_decay <= 1:
        raise ValueError(f"soft_top_k needs eps > 0, iters >= 1, eps_init > 0, 0 < eps_decay <= 1; got eps={eps}, "
                         f"iters={iters}, eps_init={eps_init}, eps_decay={eps_decay}")
    if method not in ("sort", "coordinate_descent"):
        raise ValueError(f"method must be 'sort' or 'coordinate_descent', got {method!r}")
    if not scores.is_floating_point():
        raise ValueError(f"scores must be floating point, got {scores.dtype}")
    real = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    if real.shape != scores.shape:
        raise ValueError(f"mask shape {tuple(real.shape)} must equal scores shape {tuple(scores.shape)}")
    k_t = torch.as_tensor(k, dtype=scores.dtype, device=scores.device).expand(scores.shape[:-1])
    if not (k_t > 0).all():
        raise ValueError(f"k must be > 0, got {k}")
    return _SoftTopK.apply(scores, real, k_t, float(eps), int(iters), float(eps_init), float(eps_decay),
                           method)


def soft_top_k_unrolled(scores: torch.Tensor, k: float, *, eps: float, iters: int,
                        mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reference twin: the same iterations at a fixed eps, differentiated by autograd through every
    step (memory grows with iters). Tests only."""
    real = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask
    s = scores.masked_fill(~real, float("-inf"))
    b = torch.zeros_like(scores)
    a = None
    for _ in range(iters):
        a = eps * math.log(k) - eps * torch.logsumexp((s + b) / eps, dim=-1, keepdim=True)
        b = -torch.relu(s + a)
    return torch.exp((s + a + b) / eps)
