"""Fine-tuning a token encoder on (query, document) pairs with the XTR or the ColBERT objective.

Each step draws ``batch_size`` pairs (a pure function of seed and step), encodes queries and documents,
scores every in-batch pair and takes the contrastive loss (``objectives``). The encoder is saved to
``out`` at the end, with ``train.json`` (settings, losses, time).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from condcomp.files import write_json_atomic
from condcomp.retrieval.data import RetrievalSet
from condcomp.retrieval.encoder import TokenEncoder
from condcomp.retrieval.errors import RetrievalError
from condcomp.retrieval.objectives import colbert_batch_scores, contrastive_loss, token_similarities, xtr_batch_scores
from condcomp.settings import Settings, setting
from condcomp.train.optim import autocast, build_optimizer, warmup_linear


@dataclass
class RetrievalTrainConfig(Settings):
    objective: str = setting("xtr", choices=("xtr", "colbert"), help="in-batch scoring the loss uses")
    steps: int = setting(100, ge=1)
    batch_size: int = setting(16, ge=2, help="pairs per step (each query's negatives: the other documents)")
    lr: float = setting(5e-5, gt=0.0)
    warmup: float = setting(0.1, ge=0.0, lt=1.0, help="a fraction of steps")
    k_train: int = setting(256, ge=1, help="XTR: document tokens each query token keeps over the whole batch")
    temperature: float = setting(0.05, gt=0.0, help="scores are divided by this before the softmax")
    query_max_length: int = setting(32, ge=4)
    doc_max_length: int = setting(128, ge=4)
    precision: str = setting("bf16", choices=("fp32", "bf16"))
    seed: int = setting(0, ge=0)


def batch_loss(encoder: TokenEncoder, queries: list[str], docs: list[str], cfg: RetrievalTrainConfig) -> torch.Tensor:
    """The contrastive loss of one batch of pairs (query i's document is docs[i])."""
    qb = encoder.tokenize(queries, max_length=cfg.query_max_length)
    db = encoder.tokenize(docs, max_length=cfg.doc_max_length)
    with autocast(cfg.precision):
        q, d = encoder(qb.ids, qb.mask), encoder(db.ids, db.mask)
    s = token_similarities(q, qb.mask, d, db.mask)
    scores = xtr_batch_scores(s, qb.mask, cfg.k_train) if cfg.objective == "xtr" else colbert_batch_scores(s, qb.mask)
    return contrastive_loss(scores, cfg.temperature)


def train_encoder(encoder: TokenEncoder, data: RetrievalSet, cfg: RetrievalTrainConfig, out: str | Path,
                  *, log=print) -> dict:
    """Fine-tune ``encoder`` in place on data's (query, relevant document) pairs; save it to ``out``."""
    if len(data.queries) < cfg.batch_size:
        raise RetrievalError(f"{len(data.queries)} training pairs, fewer than batch_size {cfg.batch_size}")
    encoder.train()
    opt = build_optimizer(encoder, lr=cfg.lr, weight_decay=0.01)
    losses, started = [], time.perf_counter()
    for step in range(cfg.steps):
        rng = np.random.default_rng([cfg.seed, step])
        rows = rng.choice(len(data.queries), size=cfg.batch_size, replace=False)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * warmup_linear(step, warmup_fraction=cfg.warmup, total=cfg.steps)
        loss = batch_loss(encoder, [data.queries[i] for i in rows], [data.docs[data.relevant[i]] for i in rows], cfg)
        if not torch.isfinite(loss):
            raise RetrievalError(f"the loss became {loss.item()} at step {step}; lower --lr (now {cfg.lr:g})")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 10 == 0 or step + 1 == cfg.steps:
            log(f"step {step + 1}/{cfg.steps}: loss {np.mean(losses[-10:]):.4f}")
    encoder.eval()
    out = Path(out)
    encoder.save(out)
    record = {"config": cfg.to_dict(), "data": data.description, "losses": losses,
              "train_seconds": round(time.perf_counter() - started, 1)}
    write_json_atomic(out / "train.json", record)
    return record


def read_train_record(folder: str | Path) -> dict | None:
    path = Path(folder) / "train.json"
    return json.loads(path.read_text()) if path.is_file() else None
