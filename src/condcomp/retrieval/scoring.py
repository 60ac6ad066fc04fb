"""Scoring documents for one query: XTR from retrieved tokens alone, ColBERT late interaction, and
single-vector similarity. Each returns documents ranked best first.

XTR (Lee et al., 2023): every query token i retrieves its k' nearest document tokens. A document's
score is the mean over query tokens of the best similarity among the tokens i retrieved from it; a
query token that retrieved nothing from the document contributes m_i, its own k'-th (lowest)
retrieved similarity — an upper bound on what the unseen tokens could have scored. Nothing but the
retrieved similarities is read: the scoring cost is O(query tokens x k').

ColBERT (Khattab & Zaharia, 2020): mean over query tokens of the max over *all* of the document's
tokens (MaxSim), which reads every token vector of every scored document.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from condcomp.retrieval.index import TokenIndex


@dataclass
class Ranking:
    """docs [m] document indices, best first; scores [m]; scoring_flops: multiply-adds x 2 (or
    comparisons, for XTR) spent scoring candidates after token retrieval; retrieval_flops: the token
    search itself (exact inner products; 0 when the ranking needs none)."""

    docs: np.ndarray
    scores: np.ndarray
    scoring_flops: float
    retrieval_flops: float


def xtr_scores(sims: np.ndarray, doc_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sims, doc_ids [q, k']: each query token's retrieved similarities (descending) and the document
    of each retrieved token (-1: nothing retrieved there). -> (candidate docs [m], scores [m]).

    score(d) = mean_i max(m_i, max_{j: doc_ids[i, j] = d} sims[i, j]), m_i = the last retrieved
    similarity of token i (imputation; a retrieved similarity of d is never below it)."""
    valid = doc_ids >= 0
    if not valid.any():
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    q = sims.shape[0]
    last = np.where(valid.any(1), np.where(valid, sims, np.inf).min(1), 0.0)  # m_i
    candidates, column = np.unique(doc_ids[valid], return_inverse=True)
    table = np.repeat(last[:, None], len(candidates), axis=1).astype(np.float64)  # [q, m], imputed
    rows = np.nonzero(valid)[0]
    np.maximum.at(table, (rows, column), sims[valid])
    return candidates, (table.sum(0) / q).astype(np.float32)


def xtr_scores_reference(sims: np.ndarray, doc_ids: np.ndarray) -> dict[int, float]:
    """The same rule one query token and one document at a time (tests)."""
    docs = sorted({int(d) for d in doc_ids.ravel() if d >= 0})
    scores = {}
    for d in docs:
        total = 0.0
        for i in range(sims.shape[0]):
            retrieved = [float(s) for s, dd in zip(sims[i], doc_ids[i]) if dd >= 0]
            mine = [float(s) for s, dd in zip(sims[i], doc_ids[i]) if dd == d]
            total += max(mine) if mine else (min(retrieved) if retrieved else 0.0)
        scores[d] = total / sims.shape[0]
    return scores


def maxsim(query: np.ndarray, doc: np.ndarray) -> float:
    """ColBERT late interaction: mean over query tokens [tq, dim] of the best document token [td, dim]."""
    return float((query @ doc.T).max(1).mean())


def _ranked(docs: np.ndarray, scores: np.ndarray, top: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.lexsort((docs, -scores))[:top]  # ties: the lower document index first
    return docs[order], scores[order]


def search_xtr(index: TokenIndex, query: np.ndarray, *, k_prime: int, top: int = 100) -> Ranking:
    """Rank documents for query tokens [tq, dim] from k' retrieved tokens per query token."""
    sims, rows = index.search(query, k_prime)
    doc_ids = np.where(rows >= 0, index.doc_of_token[np.maximum(rows, 0)], -1)
    docs, scores = xtr_scores(sims, doc_ids)
    docs, scores = _ranked(docs, scores, top)
    return Ranking(docs, scores, scoring_flops=float(sims.size), retrieval_flops=_token_search_flops(index, query))


def search_colbert(index: TokenIndex, query: np.ndarray, *, top: int = 100, candidates: np.ndarray | None = None,
                   k_prime: int | None = None) -> Ranking:
    """Rank by MaxSim over every token of the candidate documents: all documents (``candidates`` and
    ``k_prime`` None: exhaustive, the accuracy reference), the given ones, or those the query's tokens
    retrieved with ``k_prime`` (ColBERT's candidate generation)."""
    retrieval = 0.0
    if candidates is None and k_prime is not None:
        _, rows = index.search(query, k_prime)
        candidates = np.unique(index.doc_of_token[rows[rows >= 0]])
        retrieval = _token_search_flops(index, query)
    if candidates is None:
        sims = query @ index.vectors.T  # [tq, tokens]: one product for the whole collection
        best = np.maximum.reduceat(sims, index.doc_offsets[:-1], axis=1)  # [tq, docs]: documents are contiguous
        docs, scores = np.arange(index.num_docs), best.mean(0)
        tokens = len(index.vectors)
    else:
        docs = np.asarray(candidates, dtype=np.int64)
        scores = np.array([maxsim(query, index.doc_tokens(d)) for d in docs], dtype=np.float32)
        tokens = int(sum(index.doc_offsets[d + 1] - index.doc_offsets[d] for d in docs))
    docs, scores = _ranked(docs, scores, top)
    return Ranking(docs, scores, scoring_flops=2.0 * query.shape[0] * index.dim * tokens, retrieval_flops=retrieval)


def search_single_vector(index: TokenIndex, query: np.ndarray, *, top: int = 100) -> Ranking:
    """Rank by the cosine of mean-pooled query and document vectors."""
    pooled = query.mean(0)
    pooled = pooled / max(float(np.linalg.norm(pooled)), 1e-12)
    scores = index.doc_vectors @ pooled
    docs, scores = _ranked(np.arange(index.num_docs), scores.astype(np.float32), top)
    return Ranking(docs, scores, scoring_flops=2.0 * index.num_docs * index.dim, retrieval_flops=0.0)


def _token_search_flops(index: TokenIndex, query: np.ndarray) -> float:
    """Inner products an exact token search computes (approximate indexes compute fewer)."""
    return 2.0 * query.shape[0] * len(index.vectors) * index.dim if index.params["kind"] == "flat" else 0.0
