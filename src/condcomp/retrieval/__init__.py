"""Multi-vector retrieval: a token encoder (MiniLM + projection), a faiss document-token index, and
three scorers — XTR from retrieved tokens alone, ColBERT late interaction, single-vector — with the
XTR and ColBERT training objectives and benchmarks from shipped data (docs/retrieval.md)."""

from condcomp.retrieval.data import BENCHMARKS, RetrievalSet, load_retrieval_set
from condcomp.retrieval.encoder import EncodedTexts, TokenEncoder
from condcomp.retrieval.errors import RetrievalError
from condcomp.retrieval.index import KINDS, TokenIndex
from condcomp.retrieval.metrics import rank_of, ranking_metrics
from condcomp.retrieval.objectives import colbert_batch_scores, contrastive_loss, token_similarities, xtr_batch_scores
from condcomp.retrieval.scoring import Ranking, maxsim, search_colbert, search_single_vector, search_xtr, xtr_scores

__all__ = ["BENCHMARKS", "EncodedTexts", "KINDS", "Ranking", "RetrievalError", "RetrievalSet", "TokenEncoder",
           "TokenIndex", "colbert_batch_scores", "contrastive_loss", "load_retrieval_set", "maxsim", "rank_of",
           "ranking_metrics", "search_colbert", "search_single_vector", "search_xtr", "token_similarities",
           "xtr_batch_scores", "xtr_scores"]
