"""Token-level text encoder for multi-vector retrieval: a pretrained BERT-family encoder (MiniLM by
default), a linear projection to ``dim`` and L2 normalisation of every token vector.

    enc = TokenEncoder.from_pretrained("minilm", dim=128)
    batch = enc.tokenize(["a query", "another"], max_length=32)
    vectors = enc(batch.ids, batch.mask)          # [b, t, 128], unit norm, zeros at padding
    texts = enc.encode(docs, max_length=128)      # EncodedTexts: all real tokens, packed

A saved encoder is a folder: ``encoder.json`` (backbone name, dim, max lengths) and
``weights.safetensors`` (backbone and projection), loaded without executing code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from condcomp.convert.pretrained import DEFAULT_MODEL, load_encoder
from condcomp.files import write_json_atomic
from condcomp.retrieval.errors import RetrievalError
from condcomp.train.optim import autocast


@dataclass
class TokenBatch:
    """ids, mask: [b, t] int64 (mask 1 = real token); truncated: how many texts were cut to fit."""

    ids: torch.Tensor
    mask: torch.Tensor
    truncated: int


@dataclass
class EncodedTexts:
    """Every real token of n texts, packed: vectors [tokens, dim] float32 (unit norm); token_ids
    [tokens] int64 (the tokenizer's ids, for explanations); offsets [n + 1] int64 (text i owns rows
    offsets[i]:offsets[i+1]); truncated: texts cut to max_length."""

    vectors: np.ndarray
    token_ids: np.ndarray
    offsets: np.ndarray
    truncated: int

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def text(self, i: int) -> np.ndarray:
        return self.vectors[self.offsets[i]:self.offsets[i + 1]]

    def mean_pooled(self) -> np.ndarray:
        """[n, dim] unit-norm mean of each text's token vectors (the single-vector baseline)."""
        sums = np.add.reduceat(self.vectors, self.offsets[:-1], axis=0)
        return sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)


class TokenEncoder(nn.Module):
    """backbone (HF BertModel) -> Linear(hidden, dim, no bias) -> L2 norm, per token.

    name: the backbone it was built from ("minilm" or a folder), recorded so an index built by one
    encoder refuses queries from another.
    """

    def __init__(self, backbone: nn.Module, tokenizer, *, dim: int = 128, name: str = DEFAULT_MODEL):
        super().__init__()
        if dim < 1:
            raise RetrievalError(f"dim must be >= 1, got {dim}")
        self.backbone, self.tokenizer, self.name, self.dim = backbone, tokenizer, name, dim
        self.proj = nn.Linear(backbone.config.hidden_size, dim, bias=False)
        # Orthogonal rows: an untrained projection keeps inner products as well as a random one can.
        nn.init.orthogonal_(self.proj.weight)
        self.max_positions = int(getattr(backbone.config, "max_position_embeddings", 512))

    @classmethod
    def from_pretrained(cls, name: str = DEFAULT_MODEL, *, dim: int = 128, seed: int = 0) -> "TokenEncoder":
        backbone, tokenizer = load_encoder(name)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return cls(backbone, tokenizer, dim=dim, name=name).eval()

    @property
    def fingerprint(self) -> dict:
        """What an index records about the encoder that built it: the backbone, the width, and a hash
        of the projection (which any fine-tuning or another seed changes)."""
        import hashlib

        weights = hashlib.sha256(self.proj.weight.detach().float().contiguous().numpy().tobytes()).hexdigest()[:16]
        return {"encoder": self.name, "dim": self.dim, "vocab_size": int(self.backbone.config.vocab_size),
                "projection": weights}

    def tokenize(self, texts: list[str], *, max_length: int) -> TokenBatch:
        if max_length > self.max_positions:
            raise RetrievalError(f"max_length {max_length} exceeds the encoder's {self.max_positions} positions")
        if any(not t.strip() for t in texts):
            raise RetrievalError("empty text: every query and document must have some text")
        full = self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
        truncated = sum(len(ids) > max_length for ids in full)
        out = self.tokenizer(texts, truncation=True, max_length=max_length, padding=True, return_tensors="pt")
        return TokenBatch(out["input_ids"], out["attention_mask"], truncated)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, mask [b, t] -> [b, t, dim] unit vectors, zeros at padding."""
        hidden = self.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        vectors = F.normalize(self.proj(hidden).float(), dim=-1)
        return vectors * mask[..., None].to(vectors.dtype)

    @torch.no_grad()
    def encode(self, texts: list[str], *, max_length: int, batch_size: int = 32, precision: str = "bf16",
               progress=None) -> EncodedTexts:
        """Every real token vector of every text (in inference mode, batches sorted by length so
        little padding is computed)."""
        was_training = self.training
        self.eval()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        per_text: list[tuple[np.ndarray, np.ndarray]] = [None] * len(texts)  # type: ignore[list-item]
        truncated = 0
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            batch = self.tokenize([texts[i] for i in rows], max_length=max_length)
            truncated += batch.truncated
            with autocast(precision):
                vectors = self(batch.ids, batch.mask).float()
            for j, i in enumerate(rows):
                real = batch.mask[j].bool()
                per_text[i] = (vectors[j][real].numpy(), batch.ids[j][real].numpy())
            if progress is not None:
                progress(len(rows))
        self.train(was_training)
        lengths = np.array([len(v) for v, _ in per_text], dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        return EncodedTexts(np.concatenate([v for v, _ in per_text]).astype(np.float32),
                            np.concatenate([t for _, t in per_text]).astype(np.int64), offsets, truncated)

    def save(self, folder: str | Path) -> Path:
        """Write the encoder to ``folder`` (weights first, the description last, each atomically)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / "weights.safetensors.tmp"
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(tmp))
        tmp.replace(folder / "weights.safetensors")
        write_json_atomic(folder / "encoder.json", {"encoder": self.name, "dim": self.dim, "format": 1})
        return folder

    @classmethod
    def load(cls, source: str | Path) -> "TokenEncoder":
        """A saved encoder folder, or a pretrained backbone name ("minilm") with a fresh projection."""
        folder = Path(source)
        if not (folder / "encoder.json").is_file():
            if folder.exists():
                raise RetrievalError(f"{folder} is not a saved retrieval encoder (no encoder.json); pass a folder "
                                     "written by `condcomp retrieval train`, or 'minilm'")
            return cls.from_pretrained(str(source))
        meta = json.loads((folder / "encoder.json").read_text())
        encoder = cls.from_pretrained(meta["encoder"], dim=int(meta["dim"]))
        state = load_file(str(folder / "weights.safetensors"))
        missing, unexpected = encoder.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RetrievalError(f"{folder}/weights.safetensors does not fit the encoder it names "
                                 f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return encoder.eval()
