"""One encoder on one benchmark: index the collection, rank it for every query with each scorer, and
report quality (nDCG@10, Recall@100, MRR@10) and cost (latency p50/p95, scoring FLOPs per query,
index size and build time).

Latency is per query, after its tokens were encoded (encoding is the same for every scorer and is
reported once, as ``encode_ms``): token retrieval plus scoring for XTR, exhaustive MaxSim for ColBERT,
one matrix-vector product for the single-vector baseline, retrieval plus MaxSim over the candidates
for ColBERT's rerank. All on the calling process's threads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from condcomp.retrieval.data import RetrievalSet
from condcomp.retrieval.encoder import TokenEncoder
from condcomp.retrieval.index import TokenIndex
from condcomp.retrieval.metrics import rank_of, ranking_metrics
from condcomp.retrieval.scoring import search_colbert, search_single_vector, search_xtr

SCORERS = ("single", "colbert", "colbert-rerank", "xtr")
"""single: mean-pooled vectors; colbert: exhaustive MaxSim over every document (the accuracy reference);
colbert-rerank: MaxSim over the documents the query's tokens retrieve with k' (ColBERT's own two-stage
pipeline: same token retrieval as XTR, then every token of each candidate is read); xtr: the
retrieved similarities alone."""


@dataclass
class ScorerResult:
    scorer: str
    metrics: dict[str, float]
    p50_ms: float
    p95_ms: float
    scoring_flops: float
    retrieval_flops: float


@dataclass
class EvalResult:
    description: str
    queries: int
    docs: int
    doc_tokens: int
    index_bytes: int
    index_seconds: float
    encode_docs_seconds: float
    encode_ms: float
    truncated_docs: int
    rows: list[ScorerResult] = field(default_factory=list)


def build_index(encoder: TokenEncoder, data: RetrievalSet, *, doc_max_length: int = 128, kind: str = "flat",
                precision: str = "bf16", **index_params) -> tuple[TokenIndex, float, int]:
    """(index over the collection, seconds spent encoding it, documents truncated)."""
    started = time.perf_counter()
    encoded = encoder.encode(data.docs, max_length=doc_max_length, precision=precision)
    seconds = time.perf_counter() - started
    index = TokenIndex.build(encoded, data.doc_keys, fingerprint=encoder.fingerprint, kind=kind, **index_params)
    return index, seconds, encoded.truncated


def evaluate(encoder: TokenEncoder, data: RetrievalSet, *, scorers=SCORERS, k_prime: int = 100,
             query_max_length: int = 32, doc_max_length: int = 128, kind: str = "flat", precision: str = "bf16",
             index: TokenIndex | None = None, **index_params) -> EvalResult:
    encode_seconds, truncated = 0.0, 0
    if index is None:
        index, encode_seconds, truncated = build_index(encoder, data, doc_max_length=doc_max_length, kind=kind,
                                                       precision=precision, **index_params)
    started = time.perf_counter()
    queries = encoder.encode(data.queries, max_length=query_max_length, precision=precision)
    encode_ms = 1e3 * (time.perf_counter() - started) / max(len(data.queries), 1)
    result = EvalResult(data.description, len(data.queries), index.num_docs, len(index.vectors), index.size_bytes(),
                        index.build_seconds, encode_seconds, encode_ms, truncated)
    for scorer in scorers:
        ranks, times, scoring, retrieval = [], [], 0.0, 0.0
        for i, relevant in enumerate(data.relevant):
            q = queries.text(i)
            t0 = time.perf_counter()
            if scorer == "xtr":
                ranking = search_xtr(index, q, k_prime=k_prime)
            elif scorer == "colbert":
                ranking = search_colbert(index, q)
            elif scorer == "colbert-rerank":
                ranking = search_colbert(index, q, k_prime=k_prime)
            else:
                ranking = search_single_vector(index, q)
            times.append(time.perf_counter() - t0)
            ranks.append(rank_of(ranking.docs, relevant))
            scoring += ranking.scoring_flops
            retrieval += ranking.retrieval_flops
        n = max(len(ranks), 1)
        result.rows.append(ScorerResult(scorer, ranking_metrics(ranks), 1e3 * float(np.percentile(times, 50)),
                                        1e3 * float(np.percentile(times, 95)), scoring / n, retrieval / n))
    return result
