"""Key-block selection for sparse attention (SPLA and its block-sparse baseline): which completed
past key blocks each query block reads exactly. Keys are the "experts" here and a block of queries
chooses its top-k of them; the layer gathers the chosen blocks (``SparseLinearAttention``).

The estimate. A query q reads a key block j of n_j keys with softmax mass proportional to
M_j(q) = sum_{k in j} exp(q.k), logits pre-scaled by 1/sqrt(head_dim). A block of queries is
scored by its mean mass, E_q M_j(q) = n_j E_q E_k exp(q.k). Writing q = mu_q + a and k = mu_k + c
(a, c zero-mean, independent) and expanding exp to second order around mu_q.mu_k:

    E exp(q.k) ~ exp(mu_q.mu_k) (1 + (mu_q^T Sigma_k mu_q + mu_k^T Sigma_q mu_k + tr(Sigma_q Sigma_k)) / 2)

(the first-order term has zero mean). We keep only the diagonals of the covariances, the
per-dimension variances: a full Sigma is head_dim^2 numbers per block (as large as a
linear-attention state) and costs head_dim^2 per pair of blocks, while the diagonal costs
head_dim, like the mean term, and keeps the ranking's "spread-out keys can hold a large logit"
signal. With one scoring query (Sigma_q = 0) this is the per-query estimate
n_j exp(q.mu_k)(1 + q^T Sigma_k q / 2). Summarising the queries too makes choosing cost
O(blocks^2 * head_dim) rather than O(tokens * blocks * head_dim). ``order=1`` keeps only
n_j exp(mu_q.mu_k): the mean-key score of InfLLM-style block-sparse methods.

Causality. Query block i is scored by the queries of block i - 1: every one of them sits before
the first query of block i, so no output depends on a later token through the choice, and
decoding chooses block i's keys the moment block i begins (decode == forward). All query heads
of a key/value group choose together. The top-k candidates (blocks 0..i-1) win; with fewer
candidates than k, all of them are taken.
"""

from __future__ import annotations

import torch

from condcomp.routing.types import check_finite

ORDERS = (1, 2)


def block_summaries(keys: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-block statistics of the real keys.

    keys: [..., n_blocks, block, head_dim] (already scaled by 1/sqrt(head_dim)); real: keys' shape
    without head_dim, True = real key. Returns (mean [..., n_blocks, head_dim], var (same, the
    per-dimension population variance), count [..., n_blocks]).
    """
    w = real.to(keys.dtype)[..., None]
    count = w.sum(-2)  # [..., nb, 1]
    safe = count.clamp(min=1)
    weighted = keys * w
    mean = weighted.sum(-2) / safe
    # E[x^2] - mean^2: two reductions in one pass over the keys; clamped against rounding below 0.
    var = ((weighted * keys).sum(-2) / safe - mean * mean).clamp(min=0)
    return mean, var, count[..., 0]


def log_block_mass(q_mean: torch.Tensor, q_var: torch.Tensor, k_mean: torch.Tensor, k_var: torch.Tensor,
                   k_count: torch.Tensor, order: int = 2) -> torch.Tensor:
    """log of the estimated mean mass of each key block for each group of scoring queries (module
    docstring); -inf for empty key blocks.

    q_mean, q_var: [..., n_query_groups, head_dim]; k_mean, k_var: [..., n_blocks, head_dim];
    k_count: [..., n_blocks]. Returns [..., n_query_groups, n_blocks].
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order}")
    log_mass = q_mean @ k_mean.transpose(-1, -2) + torch.log(k_count)[..., None, :]
    if order == 2:
        # mu_q^2 . var_k + var_q . (mu_k^2 + var_k), as one matmul of concatenated features.
        left = torch.cat([q_mean * q_mean, q_var], dim=-1)
        right = torch.cat([k_var, k_mean * k_mean + k_var], dim=-1)
        log_mass = log_mass + torch.log1p(0.5 * left @ right.transpose(-1, -2))
    return log_mass


def top_blocks(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best blocks by score: (index [..., k] int64, valid [..., k] bool). Slots beyond the
    number of candidates (score -inf) are invalid and point at block 0; the layer masks them."""
    n = scores.shape[-1]
    if k == 0 or n == 0:
        empty = scores.new_zeros(*scores.shape[:-1], k, dtype=torch.int64)
        return empty, empty.bool()
    value, index = scores.topk(min(k, n), dim=-1)
    valid = value > float("-inf")
    index = index.masked_fill(~valid, 0)
    if k > n:  # fewer blocks than k: take all, pad with invalid slots
        pad = k - n
        index = torch.cat([index, index.new_zeros(*index.shape[:-1], pad)], dim=-1)
        valid = torch.cat([valid, valid.new_zeros(*valid.shape[:-1], pad)], dim=-1)
    return index, valid


def select_past_blocks(queries: torch.Tensor, query_real: torch.Tensor, keys: torch.Tensor, key_real: torch.Tensor,
                       k: int, order: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal block selection over a whole sequence (the forward pass).

    queries: [b, g, nb, rows, hd], the rows of query block i being every query head of the group
    at every position of the block; query_real: [b, 1, nb, rows]; keys: [b, g, nb, block, hd]
    scaled by 1/sqrt(hd); key_real: [b, 1, nb, block]. Block i is scored by the queries of block
    i - 1 against blocks 0..i-1. Returns (index, valid), [b, g, nb, k]. No gradient: the choice is
    discrete.
    """
    b, g, nb = queries.shape[:3]
    with torch.no_grad():
        q_mean, q_var, _ = block_summaries(queries, query_real)  # [b, g, nb, hd]
        k_mean, k_var, k_count = block_summaries(keys, key_real)
        for summary in (q_mean, q_var, k_mean, k_var):  # a NaN or inf anywhere reaches these
            check_finite(summary)
        log_mass = log_block_mass(q_mean[:, :, :-1], q_var[:, :, :-1], k_mean, k_var, k_count, order)  # [b, g, nb-1, nb]
        ids = torch.arange(nb, device=queries.device)
        later = ids[None, :] >= ids[1:, None]  # chosen-for block i = 1.. may read blocks j < i only
        scores = torch.full((b, g, nb, nb), float("-inf"), dtype=log_mass.dtype, device=log_mass.device)
        scores[:, :, 1:] = log_mass.masked_fill(later, float("-inf"))
        return top_blocks(scores, k)
