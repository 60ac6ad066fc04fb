"""Corpora encoded with a Hugging Face tokenizer, cached as memory-mapped token ids beside the byte cache.

A tokenized split keeps, for every token, the number of UTF-8 bytes of text it stands for (the text
between the previous token's end and its own end), so that the counts of a split add up to its bytes
exactly. Evaluation divides the summed loss by those bytes: bits per byte, comparable across
tokenizers and with byte-level models.

    corpus = load_corpus("stdlib")                                   # bytes, as before
    tokens = tokenize_corpus(corpus, tokenizer, name="smollm2")      # same split, token ids
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from condcomp.data.corpus import SPLITS, Corpus, DataError, default_cache_dir

_FORMAT_VERSION = 1
_CHUNK_CHARS = 1 << 16  # text is encoded in pieces of about this many characters, cut at newlines


def _pieces(text: str) -> list[str]:
    """Cut text into pieces of about _CHUNK_CHARS characters at newlines (tokenizers then run in
    parallel); every character lands in exactly one piece."""
    out, start = [], 0
    while start < len(text):
        end = min(len(text), start + _CHUNK_CHARS)
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        out.append(text[start:end])
        start = end
    return out


def encode_with_bytes(text: str, tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [n] and the UTF-8 bytes each token covers [n] (summing to the text's bytes)."""
    ids_all, bytes_all = [], []
    for piece in _pieces(text):
        enc = tokenizer(piece, add_special_tokens=False, return_offsets_mapping=True)
        ids = np.asarray(enc["input_ids"], dtype=np.int64)
        if not len(ids):
            continue
        raw = np.frombuffer(piece.encode("utf-8"), dtype=np.uint8)
        # Byte offset of every character (UTF-8 continuation bytes start with 0b10), plus the end.
        char_to_byte = np.append(np.flatnonzero((raw & 0xC0) != 0x80), len(raw))
        ends = np.maximum.accumulate(np.asarray([e for _, e in enc["offset_mapping"]], dtype=np.int64))
        ends[-1] = len(piece)  # trailing text a tokenizer skipped belongs to the last token
        byte_ends = char_to_byte[ends]
        ids_all.append(ids)
        bytes_all.append(np.diff(byte_ends, prepend=0))
    if not ids_all:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(ids_all), np.concatenate(bytes_all)


def tokenize_corpus(corpus: Corpus, tokenizer, *, name: str, cache_dir: str | Path | None = None) -> Corpus:
    """The same splits as ``corpus``, encoded with ``tokenizer`` (a fast HF tokenizer). ``name``
    identifies the tokenizer in the cache key, together with its vocabulary size and the corpus."""
    vocab = len(tokenizer)
    digest = hashlib.sha1()
    for s in SPLITS:
        arr = corpus.split(s)
        digest.update(f"{s}:{len(arr)}:".encode())
        digest.update(np.asarray(arr[: 1 << 20]).tobytes())  # the head of each split identifies it
        digest.update(np.asarray(arr[-(1 << 20):]).tobytes())
    key = hashlib.sha1(json.dumps([_FORMAT_VERSION, name, vocab, digest.hexdigest()]).encode()).hexdigest()[:16]
    folder = (Path(cache_dir) if cache_dir else default_cache_dir()) / "tokenized" / key
    dtype = np.uint16 if vocab <= np.iinfo(np.uint16).max + 1 else np.uint32
    if not (folder / "meta.json").is_file():
        _build(folder, corpus, tokenizer, dtype, name)
    meta = json.loads((folder / "meta.json").read_text())
    ids, nbytes = {}, {}
    for s in SPLITS:
        n = meta["tokens"][s]
        ids[s] = np.memmap(folder / f"{s}.ids", dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype)
        nbytes[s] = np.memmap(folder / f"{s}.bytes", dtype=np.uint16, mode="r", shape=(n,)) if n else np.zeros(0, np.uint16)
    return Corpus(train=ids["train"], val=ids["val"], test=ids["test"],
                  description=f"{corpus.description}, tokenized with {name}", num_files=corpus.num_files,
                  token_bytes=nbytes, tokenizer=name, skipped=corpus.skipped)


def _build(folder: Path, corpus: Corpus, tokenizer, dtype, name: str) -> None:
    tmp = folder.with_name(folder.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    counts = {}
    for s in SPLITS:
        text = bytes(np.asarray(corpus.split(s))).decode("utf-8", errors="replace")
        ids, nbytes = encode_with_bytes(text, tokenizer)
        if len(ids) and int(ids.max()) >= np.iinfo(dtype).max + 1:
            raise DataError(f"tokenizer {name} produced id {int(ids.max())}, beyond its vocabulary")
        ids.astype(dtype).tofile(tmp / f"{s}.ids")
        np.minimum(nbytes, np.iinfo(np.uint16).max).astype(np.uint16).tofile(tmp / f"{s}.bytes")
        counts[s] = len(ids)
    (tmp / "meta.json").write_text(json.dumps({"tokenizer": name, "tokens": counts, "dtype": np.dtype(dtype).name}))
    try:
        os.rename(tmp, folder)  # atomic: readers see a complete cache or none
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "meta.json").is_file():
            raise
