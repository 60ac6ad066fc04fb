"""In-batch training objectives for multi-vector encoders: XTR's and ColBERT's.

Both score every (query, document) pair of a batch from token similarities and apply a contrastive
loss whose target is each query's own document (the others are its negatives).

XTR: each query token keeps only its ``k_train`` highest similarities over *all* document tokens of
the batch (A_ij = 1 for those); score(Q, D) = (1/Z) sum_i max_j A_ij q_i . d_j, with Z the number of
query tokens that kept at least one token of D (at least 1). The model is thus trained to score well
from the tokens it would retrieve — the condition XTR's retrieval-only scoring needs.

ColBERT: score(Q, D) = mean_i max_j q_i . d_j over the real tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_similarities(q: torch.Tensor, q_mask: torch.Tensor, d: torch.Tensor, d_mask: torch.Tensor) -> torch.Tensor:
    """q [B, tq, dim], d [B', td, dim] (masks [., t], 1 = real) -> S [B, tq, B', td] in fp32, -inf at
    document padding."""
    s = torch.einsum("aid,bjd->aibj", q.float(), d.float())
    return s.masked_fill(~d_mask.bool()[None, None], float("-inf"))


def colbert_batch_scores(s: torch.Tensor, q_mask: torch.Tensor) -> torch.Tensor:
    """S [B, tq, B', td] -> [B, B']: mean over real query tokens of the max over document tokens."""
    best = s.amax(-1)  # [B, tq, B']
    m = q_mask.to(best.dtype)[:, :, None]
    return (best * m).sum(1) / m.sum(1).clamp(min=1)


def xtr_batch_scores(s: torch.Tensor, q_mask: torch.Tensor, k_train: int) -> torch.Tensor:
    """S [B, tq, B', td] -> [B, B'] XTR in-batch scores (module docstring)."""
    b, tq, b2, td = s.shape
    flat = s.reshape(b, tq, b2 * td)
    k = min(k_train, b2 * td)
    top = flat.topk(k, dim=-1).indices
    kept = torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, top, True)
    kept &= torch.isfinite(flat)  # never a padding token
    kept = kept.view(b, tq, b2, td)
    # max_j A_ij s_ij over the document's real tokens: a token not kept counts 0, padding never.
    best = torch.where(kept | ~torch.isfinite(s), s, torch.zeros((), dtype=s.dtype)).amax(-1)
    real = q_mask.bool()[:, :, None]
    z = (kept.any(-1) & real).sum(1).clamp(min=1)  # [B, B']
    return (best * real).sum(1) / z


def contrastive_loss(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """scores [B, B] with query b's own document in column b -> mean cross-entropy over queries."""
    return F.cross_entropy(scores / temperature, torch.arange(scores.shape[0], device=scores.device))


def xtr_batch_scores_reference(q, q_mask, d, d_mask, k_train: int) -> torch.Tensor:
    """The same scores one query token at a time, in plain Python loops (tests)."""
    b, b2 = q.shape[0], d.shape[0]
    out = torch.zeros(b, b2, dtype=torch.float64)
    for a in range(b):
        total = torch.zeros(b2, dtype=torch.float64)
        hits = torch.zeros(b2, dtype=torch.int64)
        for i in range(q.shape[1]):
            if not q_mask[a, i]:
                continue
            pool = [(float(q[a, i] @ d[c, j]), c, j) for c in range(b2) for j in range(d.shape[1]) if d_mask[c, j]]
            kept = {(c, j) for _, c, j in sorted(pool, key=lambda p: -p[0])[:k_train]}
            for c in range(b2):
                values = [sim if (cc, j) in kept else 0.0 for sim, cc, j in pool if cc == c]
                total[c] += max(values)
                hits[c] += any(cc == c for cc, _ in kept)
        out[a] = total / hits.clamp(min=1)
    return out
