"""Sequence routers: a layer chooses which tokens of each sequence it computes (MoD, CoLT5, CoDA)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from condcomp.routing.base import Router, RouterTokens
from condcomp.routing.soft_top_k import soft_top_k
from condcomp.routing.types import Routing, RoutingError

WEIGHTINGS = ("soft_top_k", "sigmoid")
CAUSAL_SCHEMES = (None, "aux_loss", "predictor")


def top_k_per_row(scores: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[b, t] scores (-inf = never), k [b] int -> [b, t] bool: the k[row] best of each row.
    Ties go to the earlier position (stable sort), so the choice is deterministic."""
    order = scores.sort(dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return rank < k[:, None]


class TokenSelectRouter(Router):
    """Picks ceil(capacity * real tokens) tokens per sequence by a learned score s_i = x_i . u.

    Routing: one group (the computation being skipped or not); ``token_index`` ascending, so the
    selected tokens of each sequence are contiguous and in position order.

    weighting: how a selected token's output is scaled (this is what gives the router gradient)
        "soft_top_k": w = soft top-k of the sequence's scores (CoLT5/CoDA): in [0, 1], sums to k,
            exactly 1 for every token at capacity 1.0. Depends on the whole sequence: encoders only.
        "sigmoid":    w = sigmoid(s_i): depends on the token alone (MoD-style, decoders).

    HAZARD — top-k over a sequence reads the future: whether token t is picked depends on later
    tokens' scores. causal_scheme says how a decoder avoids it (Raposo et al., 2024, mixture-of-depths):
        None:        no fix; ``causal`` is False and a decoder refuses to build.
        "aux_loss":  the router logit is trained (BCE, aux loss "router_bce") to predict top-k
                     membership; at inference (eval()) a token is computed iff s_i > 0.
        "predictor": a small MLP on the stop-gradient input predicts membership (aux loss
                     "predictor_bce", trains only the predictor); at inference, computed iff its logit > 0.
    In training the selection stays the paper's top-k (the known, small leak of MoD training: the
    picked set depends on the sequence), so ``causal_in_training`` is False; every inference-mode
    output is causal (``causal`` is True), and tests prove both.
    At inference the number computed varies per sequence; metric "fraction_selected" reports it and
    "predictor_accuracy" the agreement of the causal decision with top-k.

    Args:
        d_model: input size. capacity: fraction of real tokens computed per sequence, (0, 1].
        eps: soft top-k temperature. predictor_hidden: hidden size of the predictor MLP.
    """

    def __init__(self, *, d_model: int, capacity: float, weighting: str = "soft_top_k",
                 causal_scheme: str | None = None, eps: float = 0.1, predictor_hidden: int = 64):
        super().__init__(d_model=d_model)
        if not 0 < capacity <= 1:
            raise RoutingError(f"capacity must be in (0, 1] (fraction of tokens computed), got {capacity}")
        if weighting not in WEIGHTINGS:
            raise RoutingError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
        if causal_scheme not in CAUSAL_SCHEMES:
            raise RoutingError(f"causal_scheme must be one of {CAUSAL_SCHEMES}, got {causal_scheme!r}")
        if causal_scheme is not None and weighting == "soft_top_k":
            raise RoutingError("soft_top_k weights depend on every token of the sequence, future ones included; "
                               "a causal router needs weighting='sigmoid'")
        if eps <= 0:
            raise RoutingError(f"eps must be > 0, got {eps}")
        self.capacity = capacity
        self.weighting, self.causal_scheme, self.eps = weighting, causal_scheme, eps
        self.score = nn.Linear(d_model, 1, bias=False)
        self.predictor = (nn.Sequential(nn.Linear(d_model, predictor_hidden), nn.GELU(), nn.Linear(predictor_hidden, 1))
                          if causal_scheme == "predictor" else None)

    @property
    def causal(self) -> bool:
        return self.causal_scheme is not None

    @property
    def aux_loss_names(self) -> tuple[str, ...]:
        return {"aux_loss": ("router_bce",), "predictor": ("predictor_bce",)}.get(self.causal_scheme, ())

    @property
    def causal_in_training(self) -> bool:
        return False  # training picks the top-k of the whole sequence

    def tokens_per_sequence(self, real_count: torch.Tensor) -> torch.Tensor:
        """[b] real tokens -> [b] tokens selected in training (at least one if any is real)."""
        return torch.ceil(real_count.to(torch.float64) * self.capacity - 1e-9).to(torch.int64)

    def scores(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden @ self.score.weight.to(hidden.dtype).t()

    def select(self, logits: torch.Tensor, tokens: RouterTokens) -> Routing:
        """Needs input [batch, seq, d]; returns a one-group Routing, token_index ascending."""
        if len(tokens.shape) != 2:
            raise RoutingError(f"a sequence router needs input [batch, seq, d], got leading shape {tokens.shape}")
        b, t = tokens.shape
        real_flat, h = tokens.real, tokens.hidden
        real = real_flat.view(b, t)
        s = logits.view(b, t)
        k = self.tokens_per_sequence(real.sum(1))
        top = top_k_per_row(s.detach().masked_fill(~real, float("-inf")), k) & real
        aux, metrics = {}, {}
        decide = None
        if self.causal_scheme == "aux_loss":
            aux["router_bce"] = _masked_bce(s, top, real)
            decide = s.detach() > 0
        elif self.causal_scheme == "predictor":
            p = self.predictor(h.detach().to(self.predictor[0].weight.dtype)).view(b, t).to(h.dtype)
            aux["predictor_bce"] = _masked_bce(p, top, real)
            decide = p.detach() > 0
        if decide is not None:
            agree = ((decide == top) & real).sum() / real.sum().clamp(min=1)
            metrics["predictor_accuracy"] = agree.detach()
        if self.weighting == "soft_top_k":
            w = soft_top_k(s, k.clamp(min=1).to(s.dtype), eps=self.eps, mask=real)
        else:
            w = torch.sigmoid(s)
        w_flat = w.reshape(-1)
        per_sequence = None
        if tokens.all_real and (self.training or decide is None):
            # Every sequence selects the same number of tokens: take them as the top-k indices, sorted
            # (fixed size, so nothing is read back from the device; the same set ``top`` marks).
            per_sequence = self._tokens_per_full_sequence(t)
            picked = s.detach().sort(dim=-1, descending=True, stable=True).indices[:, :per_sequence]
            rows = torch.arange(b, device=s.device)[:, None] * t
            token_index = (picked.sort(dim=-1).values + rows).reshape(-1)
            fraction = torch.full((), per_sequence / t, device=s.device)
        else:
            selected = top if (self.training or decide is None) else decide & real
            flat_sel = selected.reshape(-1)
            token_index = flat_sel.nonzero().squeeze(1)  # ascending: row-major, positions in order
            fraction = flat_sel.sum() / real_flat.sum().clamp(min=1)
        metrics["fraction_selected"] = fraction.detach()
        metrics["mean_weight"] = (w_flat[token_index].mean() if token_index.numel() else w.new_zeros(())).detach()
        return Routing(token_index=token_index,
                       group_sizes=torch.full((1,), token_index.numel(), dtype=torch.int64, device=s.device),
                       combine_weights=w_flat.index_select(0, token_index), num_tokens=b * t,
                       dropped=torch.zeros(b * t, dtype=torch.bool, device=logits.device), aux_losses=aux,
                       metrics=metrics, tokens_per_sequence=per_sequence)

    def _tokens_per_full_sequence(self, t: int) -> int:
        """``tokens_per_sequence`` of a sequence of t real tokens, on the host (the same float64 arithmetic)."""
        return math.ceil(t * self.capacity - 1e-9)


def _masked_bce(logits: torch.Tensor, target: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    loss = F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none")
    return (loss * real).sum() / real.sum().clamp(min=1)

