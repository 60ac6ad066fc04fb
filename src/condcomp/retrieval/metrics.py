"""Ranking metrics for queries with one relevant document each."""

from __future__ import annotations

import math

import numpy as np


def rank_of(ranked_docs: np.ndarray, relevant: int) -> int | None:
    """1-based rank of the relevant document in a ranking, None if absent."""
    hits = np.nonzero(np.asarray(ranked_docs) == relevant)[0]
    return int(hits[0]) + 1 if len(hits) else None


def ranking_metrics(ranks: list[int | None]) -> dict[str, float]:
    """nDCG@10, Recall@100 and MRR@10 averaged over queries (one relevant document: the ideal DCG is 1)."""
    n = max(len(ranks), 1)
    return {
        "ndcg@10": sum(1 / math.log2(r + 1) for r in ranks if r is not None and r <= 10) / n,
        "recall@100": sum(1 for r in ranks if r is not None and r <= 100) / n,
        "mrr@10": sum(1 / r for r in ranks if r is not None and r <= 10) / n,
    }
