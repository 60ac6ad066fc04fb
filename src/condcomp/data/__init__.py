"""Offline corpora and byte-level batches."""

from condcomp.data.batches import decode, encode, eval_batches, train_batch
from condcomp.data.corpus import Corpus, DataError, load_corpus

__all__ = ["Corpus", "DataError", "decode", "encode", "eval_batches", "load_corpus", "train_batch"]
