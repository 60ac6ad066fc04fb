"""Text tables of retrieval results."""

from __future__ import annotations

from condcomp.retrieval.evaluate import EvalResult

_NAMES = {"single": "single-vector (mean-pooled)", "colbert": "ColBERT MaxSim, exhaustive",
          "colbert-rerank": "ColBERT MaxSim of k' candidates", "xtr": "XTR, retrieved tokens only"}


def result_table(result: EvalResult, *, label: str, k_prime: int) -> str:
    """One row per scorer: quality, latency, scoring cost (relative to exhaustive ColBERT when present) and
    the token search's cost (exact search; an approximate index spends less, not counted)."""
    colbert = next((r for r in result.rows if r.scorer == "colbert"), None)
    head = (f"{'encoder':29} {'scorer':33} {'nDCG@10':>8} {'R@100':>6} {'MRR@10':>7} {'p50 ms':>7} {'p95 ms':>7} "
            f"{'scoring FLOPs':>13} {'x ColBERT':>9} {'retrieval FLOPs':>15}")
    lines = [f"{result.description}: {result.queries} queries, {result.docs} documents, {result.doc_tokens:,} tokens; "
             f"index {result.index_bytes / 2**20:.1f} MiB built in {result.index_seconds:.1f} s (documents encoded in "
             f"{result.encode_docs_seconds:.0f} s); query encoding {result.encode_ms:.1f} ms; k' = {k_prime}",
             head, "-" * len(head)]
    for r in result.rows:
        ratio = f"{r.scoring_flops / colbert.scoring_flops:>9.2g}" if colbert and colbert.scoring_flops else ""
        lines.append(f"{label[-29:]:29} {_NAMES[r.scorer]:33} {r.metrics['ndcg@10']:>8.4f} {r.metrics['recall@100']:>6.3f} "
                     f"{r.metrics['mrr@10']:>7.4f} {r.p50_ms:>7.2f} {r.p95_ms:>7.2f} {r.scoring_flops:>13.3g} {ratio:>9} "
                     f"{r.retrieval_flops:>15.3g}")
    return "\n".join(lines)
