"""A document-token index on faiss: every token vector of every document, searchable by inner product.

    index = TokenIndex.build(encoded_docs, doc_keys, fingerprint=enc.fingerprint, kind="flat")
    sims, tokens = index.search(query_vectors, k=100)    # [q, k] each; tokens are rows of the index
    index.save("idx/"); TokenIndex.load("idx/", expect=enc.fingerprint)

kinds: "flat" (exact inner product, ``IndexFlatIP``), "ivf" (``IndexIVFFlat``: ``nlist`` k-means cells,
``nprobe`` searched) and "hnsw" (``IndexHNSWFlat``: ``hnsw_m`` links per node, ``ef_search`` candidates).

An index folder holds ``arrays.safetensors`` (token vectors, their document, their token id, document
offsets, mean-pooled document vectors), ``faiss.index`` for the trained kinds (flat is rebuilt on
load), and ``manifest.json`` (the encoder's fingerprint, the kind and its parameters, document keys,
each file's sha256). It is written in a temporary folder that replaces the target only when complete,
and every file is checked against the manifest on load.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from condcomp.files import sha256_file
from condcomp.retrieval.encoder import EncodedTexts
from condcomp.retrieval.errors import RetrievalError

KINDS = ("flat", "ivf", "hnsw")
_ARRAYS = "arrays.safetensors"
_FAISS = "faiss.index"
_MANIFEST = "manifest.json"


def _faiss():
    try:
        import faiss
    except ImportError:
        raise RetrievalError("retrieval needs faiss: pip install faiss-cpu (or pip install -e '.[all]')") from None
    return faiss


class TokenIndex:
    """Token vectors of a document collection and a faiss index over them.

    vectors [n_tokens, dim] float32 unit rows; doc_of_token [n_tokens] int64; token_ids [n_tokens] int64;
    doc_offsets [n_docs + 1]; doc_vectors [n_docs, dim] (mean-pooled, for single-vector search);
    doc_keys: n_docs names; fingerprint: the encoder's; params: the kind and its settings.
    """

    def __init__(self, vectors, doc_of_token, token_ids, doc_offsets, doc_vectors, doc_keys, fingerprint, params,
                 faiss_index, build_seconds: float = 0.0):
        self.vectors, self.doc_of_token, self.token_ids = vectors, doc_of_token, token_ids
        self.doc_offsets, self.doc_vectors, self.doc_keys = doc_offsets, doc_vectors, list(doc_keys)
        self.fingerprint, self.params, self.faiss_index = dict(fingerprint), dict(params), faiss_index
        self.build_seconds = build_seconds

    @property
    def num_docs(self) -> int:
        return len(self.doc_keys)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    def doc_tokens(self, d: int) -> np.ndarray:
        """[tokens of document d, dim]."""
        return self.vectors[self.doc_offsets[d]:self.doc_offsets[d + 1]]

    @classmethod
    def build(cls, docs: EncodedTexts, doc_keys: list[str], *, fingerprint: dict, kind: str = "flat",
              nlist: int = 1024, nprobe: int = 32, hnsw_m: int = 32, ef_search: int = 128,
              seed: int = 0) -> "TokenIndex":
        if kind not in KINDS:
            raise RetrievalError(f"index kind must be one of {KINDS}, got {kind!r}")
        if len(docs) != len(doc_keys):
            raise RetrievalError(f"{len(docs)} encoded documents but {len(doc_keys)} keys")
        if len(docs) == 0:
            raise RetrievalError("no documents to index")
        started = time.perf_counter()
        lengths = np.diff(docs.offsets)
        doc_of_token = np.repeat(np.arange(len(docs), dtype=np.int64), lengths)
        params = {"kind": kind}
        if kind == "ivf":
            params.update(nlist=min(nlist, max(1, len(docs.vectors) // 39)), nprobe=nprobe, seed=seed)
        elif kind == "hnsw":
            params.update(hnsw_m=hnsw_m, ef_search=ef_search)
        index = _make_faiss(docs.vectors, params)
        return cls(docs.vectors, doc_of_token, docs.token_ids, docs.offsets, docs.mean_pooled(), doc_keys,
                   fingerprint, params, index, time.perf_counter() - started)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """queries [q, dim] -> (sims [q, k] descending, token rows [q, k]; -1 where fewer were found)."""
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise RetrievalError(f"query vectors must be [tokens, {self.dim}], got {tuple(queries.shape)}")
        k = min(k, len(self.vectors))
        sims, rows = self.faiss_index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return sims, rows

    def size_bytes(self) -> int:
        """Bytes of the token vectors plus what faiss adds (IVF lists, HNSW links), as written to disk."""
        faiss = _faiss()
        extra = 0 if self.params["kind"] == "flat" else len(faiss.serialize_index(self.faiss_index))
        return self.vectors.nbytes + extra

    # -- files -----------------------------------------------------------------------------

    def save(self, folder: str | Path) -> Path:
        from safetensors.numpy import save_file

        faiss = _faiss()
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file({"vectors": self.vectors, "doc_of_token": self.doc_of_token, "token_ids": self.token_ids,
                   "doc_offsets": self.doc_offsets, "doc_vectors": self.doc_vectors.astype(np.float32)},
                  str(tmp / _ARRAYS))
        files = [_ARRAYS]
        if self.params["kind"] != "flat":
            faiss.write_index(self.faiss_index, str(tmp / _FAISS))
            files.append(_FAISS)
        manifest = {"format": 1, "fingerprint": self.fingerprint, "params": self.params, "doc_keys": self.doc_keys,
                    "build_seconds": self.build_seconds,
                    "files": {name: {"sha256": sha256_file(tmp / name), "bytes": (tmp / name).stat().st_size}
                              for name in files}}
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=1))
        for name in [*files, _MANIFEST]:
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        old = folder.with_name(f"{folder.name}.old-{os.getpid()}")
        if folder.exists():
            folder.rename(old)  # the previous index stays whole until the new one is in place
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
        return folder

    @classmethod
    def load(cls, folder: str | Path, *, expect: dict | None = None) -> "TokenIndex":
        """Load and verify an index; ``expect``: the querying encoder's fingerprint, which must match."""
        from safetensors.numpy import load_file

        faiss = _faiss()
        folder = Path(folder)
        manifest_path = folder / _MANIFEST
        if not manifest_path.is_file():
            raise RetrievalError(f"{folder} is not a retrieval index (no {_MANIFEST}); build one with "
                                 "`condcomp retrieval index`")
        try:
            manifest = json.loads(manifest_path.read_text())
            files = manifest["files"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise RetrievalError(f"{manifest_path} is damaged; rebuild the index") from None
        for name, entry in files.items():
            path = folder / name
            if not path.is_file() or path.stat().st_size != entry["bytes"] or sha256_file(path) != entry["sha256"]:
                raise RetrievalError(f"{path} is missing, partial or corrupt (it does not match {_MANIFEST}); "
                                     "rebuild the index")
        fingerprint = manifest["fingerprint"]
        if expect is not None and {k: expect.get(k) for k in fingerprint} != fingerprint:
            raise RetrievalError(f"the index at {folder} was built by encoder {fingerprint} but the query encoder is "
                                 f"{expect}; search with the encoder that built it, or rebuild the index")
        arrays = load_file(str(folder / _ARRAYS))
        params = manifest["params"]
        if params["kind"] == "flat":
            index = _make_faiss(arrays["vectors"], params)
        else:
            index = faiss.read_index(str(folder / _FAISS))
            _set_search_params(index, params)
        return cls(arrays["vectors"], arrays["doc_of_token"], arrays["token_ids"], arrays["doc_offsets"],
                   arrays["doc_vectors"], manifest["doc_keys"], fingerprint, params, index,
                   float(manifest.get("build_seconds", 0.0)))


def _make_faiss(vectors: np.ndarray, params: dict):
    faiss = _faiss()
    dim = vectors.shape[1]
    kind = params["kind"]
    if kind == "flat":
        index = faiss.IndexFlatIP(dim)
    elif kind == "ivf":
        quantizer = faiss.IndexFlatIP(dim)
        index = faiss.IndexIVFFlat(quantizer, dim, params["nlist"], faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(params.get("seed", 0))
        sample = vectors[rng.choice(len(vectors), size=min(len(vectors), 256 * params["nlist"]), replace=False)]
        index.train(np.ascontiguousarray(sample))
    else:
        index = faiss.IndexHNSWFlat(dim, params["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
    index.add(np.ascontiguousarray(vectors))
    _set_search_params(index, params)
    return index


def _set_search_params(index, params: dict) -> None:
    if params["kind"] == "ivf":
        index.nprobe = params["nprobe"]
    elif params["kind"] == "hnsw":
        index.hnsw.efSearch = params["ef_search"]
