"""Key-block selection for sparse attention (SPLA and its block-sparse baseline): which completed
past key blocks each query block reads exactly. Keys are the "experts" here and a block of queries
chooses its top-k of them; the layer gathers the chosen blocks (``SparseLinearAttention``).

The estimate. A query q reads a key block j of n_j keys with softmax mass proportional to
M_j(q) = sum_{k in j} exp(q.k), logits pre-scaled by 1/sqrt(head_dim). Expanding exp(q.k) to second
order around the block's mean key mu_j and taking the expectation over the block's keys:

    M_j(q) ~ n_j exp(q.mu_j) (1 + q^T Sigma_j q / 2)

(the first-order term vanishes because the keys' deviations from their mean sum to zero). We keep
only the diagonal of Sigma_j, the per-dimension key variance: the full covariance is head_dim^2
numbers per block (as large as a linear-attention state) and costs head_dim^2 per (query, block)
pair, while the diagonal costs head_dim, like the mean term, and keeps the ranking's
"spread-out blocks can hold a large logit" signal. ``order=1`` drops the variance term: the
mean-key score InfLLM-style block-sparse methods use.

Causality. The scoring queries of query block i are the queries of block i - 1: every one of them
sits before the first query of block i, so no output depends on a later token through the
choice, and decoding can choose block i's keys the moment block i begins (decode == forward).
A query's share of each candidate block (its estimated masses normalised over the candidates) is
averaged over those queries (all heads of a key/value group choose together), and the top-k
candidates win; with fewer candidates than k, all of them are taken.
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
    mean = (keys * w).sum(-2) / safe
    var = (((keys - mean[..., None, :]) ** 2) * w).sum(-2) / safe
    return mean, var, count[..., 0]


def log_block_mass(queries: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, count: torch.Tensor,
                   order: int = 2) -> torch.Tensor:
    """log M_j(q) for every query and block (module docstring); -inf for empty blocks.

    queries: [..., rows, head_dim]; mean, var: [..., n_blocks, head_dim]; count: [..., n_blocks].
    Returns [..., rows, n_blocks].
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order}")
    log_mass = queries @ mean.transpose(-1, -2) + torch.log(count)[..., None, :]
    if order == 2:
        log_mass = log_mass + torch.log1p(0.5 * (queries * queries) @ var.transpose(-1, -2))
    return log_mass


def block_scores(queries: torch.Tensor, query_real: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                 count: torch.Tensor, candidates: torch.Tensor | None = None, order: int = 2) -> torch.Tensor:
    """Each candidate block's share of the scoring queries' estimated mass, averaged over the real
    queries: [..., n_blocks], -inf where a block is no candidate (or empty).

    queries: [..., rows, head_dim]; query_real: [..., rows] bool; mean/var/count as from
    ``block_summaries`` with n_blocks blocks; candidates: bool, broadcastable to [..., n_blocks].
    """
    log_mass = log_block_mass(queries, mean, var, count, order)  # [..., rows, nb]
    blocked = count <= 0
    if candidates is not None:
        blocked = blocked | ~candidates
    log_mass = log_mass.masked_fill(blocked[..., None, :], float("-inf"))
    # A row with no candidate at all is all -inf: its softmax is NaN, zeroed (and it has no choice to make).
    share = torch.softmax(log_mass, dim=-1).nan_to_num(0.0)
    w = query_real.to(share.dtype)[..., None]
    score = (share * w).sum(-2) / w.sum(-2).clamp(min=1)
    return score.masked_fill(blocked, float("-inf"))


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
                       k: int, order: int = 2, chunk_elements: int = 1 << 24) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal block selection over a whole sequence (the forward pass).

    queries: [b, g, nb, rows, hd], the rows of query block i being every query head of the group
    at every position of the block; query_real: [b, nb, rows] or broadcastable; keys: [b, g, nb,
    block, hd] and key_real: [b, 1, nb, block], both scaled like the logits. Block i is scored by
    the queries of block i - 1 against blocks 0..i-1. Returns (index, valid), [b, g, nb, k].
    Runs without gradient (the choice is discrete), in chunks of query blocks to bound memory.
    """
    b, g, nb, rows, _ = queries.shape
    with torch.no_grad():
        check_finite(queries)
        check_finite(keys)
        mean, var, count = block_summaries(keys, key_real)  # [b, g, nb, hd], [b, g|1, nb]
        count = count.expand(b, g, nb)
        scores = torch.full((b, g, nb, nb), float("-inf"), dtype=queries.dtype, device=queries.device)
        step = max(1, chunk_elements // max(1, b * g * rows * nb))
        block_ids = torch.arange(nb, device=queries.device)
        for start in range(1, nb, step):
            stop = min(nb, start + step)
            scorer = queries[:, :, start - 1 : stop - 1]  # queries of the block before each chosen-for block
            scorer_real = query_real[..., start - 1 : stop - 1, :]
            candidates = block_ids[None, :] < block_ids[start:stop, None]  # [chunk, nb]: j < i
            scores[:, :, start:stop] = block_scores(scorer, scorer_real, mean[:, :, None], var[:, :, None],
                                                    count[:, :, None], candidates, order)
        return top_blocks(scores, k)
