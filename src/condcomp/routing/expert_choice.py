"""Expert-choice routing (Zhou et al., 2022): each expert picks its top tokens."""

from __future__ import annotations

import math

import torch
from torch import nn

from condcomp.recompute import is_recomputing
from condcomp.routing.base import Router, RouterTokens
from condcomp.routing.losses import router_z_loss
from condcomp.routing.metrics import routing_metrics
from condcomp.routing.types import Routing, RoutingError

MODES = ("global", "per_sequence", "per_position")


def _top_tokens(scores: torch.Tensor, c: int):
    """The c best entries along the last axis, ties going to the earlier token (deterministic,
    unlike topk). scores [..., n] -> values, indices [..., c]."""
    vals, idx = scores.sort(dim=-1, descending=True, stable=True)
    return vals[..., :c], idx[..., :c]


class ExpertChoiceRouter(Router):
    """Experts choose tokens: expert j takes the c tokens with the highest router probability S[:, j].

    S = softmax over experts of x W; c = ceil(capacity_factor * tokens_in_group / experts);
    combine weight = the picked score. A token may be picked by 0..e experts. Load is perfectly
    balanced by construction, so no balance loss is needed (a z-loss is still returned).

    HAZARD — mode="global" ranks all tokens of the batch against each other, future positions
    included: a token's output depends on tokens that come after it. Use it only in encoders; a
    decoder refuses to build with it (``causal`` is False).

    mode="per_sequence" ranks each sequence's tokens on its own (c = ceil(capacity_factor * seq /
    experts) per expert and sequence): the image models' choice (EC-DiT routes each image over its
    patches). Like global it reads the future, but no sequence's routing depends on another's, so
    outputs are batch-invariant. Needs input [batch, seq, d].

    mode="per_position" is the causal scheme for decoders:
    - training: each position t is its own group; experts choose among the batch's tokens at
      position t (c = ceil(capacity_factor * batch / experts)). Those tokens depend only on positions
      <= t, so nothing reads the future; the competition is across sequences, not along time.
    - inference (``eval()``): batch-independent thresholds. While training, each expert tracks an
      exponential moving average of the score at its capacity boundary; at inference a token goes to
      expert j iff S[i, j] >= threshold_j. Decisions depend on the token alone, so generation with
      batch 1 behaves like training on average.
    Trade-offs: per-position groups are small (the batch size), so selection is noisier than global
    top-k; the threshold keeps compute per token right only on average — load is not capped at
    inference and a token may get zero or all experts.

    Args:
        d_model, num_experts: sizes.
        capacity_factor: > 0; 2 matches top-2 compute.
        mode: "global" (encoders), "per_sequence" (image models, encoders) or "per_position" (decoders).
        threshold_momentum: EMA momentum of the inference thresholds (per_position mode).
    """

    aux_loss_names = ("z_loss",)

    def __init__(self, *, d_model: int, num_experts: int, capacity_factor: float = 2.0, mode: str = "global",
                 threshold_momentum: float = 0.99):
        super().__init__(d_model=d_model)
        if num_experts < 1:
            raise RoutingError(f"num_experts must be >= 1, got {num_experts}")
        if capacity_factor is None or not capacity_factor > 0:
            raise RoutingError(f"capacity_factor must be > 0 for expert choice, got {capacity_factor} "
                               "(expert choice has no dropless form: capacity is what each expert picks)")
        if mode not in MODES:
            raise RoutingError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0 <= threshold_momentum < 1:
            raise RoutingError(f"threshold_momentum must be in [0, 1), got {threshold_momentum}")
        self.num_experts = num_experts
        self.capacity_factor = capacity_factor
        self.mode = mode
        self.momentum = threshold_momentum
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.register_buffer("thresholds", torch.zeros(num_experts))
        self.register_buffer("thresholds_seen", torch.zeros((), dtype=torch.bool))

    @property
    def causal(self) -> bool:
        return self.mode == "per_position"

    def capacity(self, group_tokens: int) -> int:
        return min(group_tokens, math.ceil(self.capacity_factor * group_tokens / self.num_experts))

    def select(self, logits: torch.Tensor, tokens: RouterTokens) -> Routing:
        real = tokens.real
        n = logits.shape[0]
        probs = logits.softmax(dim=-1)
        scores = probs if tokens.all_real else probs.masked_fill(~real[:, None], float("-inf"))

        fixed = tokens.all_real  # every pick is a real token: fixed-size routing, nothing to filter
        if self.mode == "global":
            vals, idx = _top_tokens(scores.t(), self.capacity(n if tokens.all_real else int(real.sum())))  # [e, c]
        elif len(tokens.shape) != 2:
            raise RoutingError(f"{self.mode} expert choice needs input [batch, seq, d] to know the sequences")
        elif self.mode == "per_sequence":
            vals, idx = self._per_sequence(scores, *tokens.shape)
        elif self.training:
            vals, idx = self._per_position(scores, *tokens.shape, all_real=tokens.all_real)
        else:
            vals, idx = self._thresholded(scores)
            fixed = False  # how many pass a threshold is known only from the scores
        if fixed:
            # No padding and no threshold: every slot holds a real token. Keeping them all (no boolean
            # mask) gives shapes known in advance, so nothing waits for the device.
            token_index, combine = idx.reshape(-1), vals.reshape(-1)
            group_sizes = torch.full((self.num_experts,), idx.shape[1], dtype=torch.int64, device=logits.device)
        else:
            keep = torch.isfinite(vals)  # drops padding (and below-threshold slots)
            token_index = idx[keep]
            combine = vals[keep]
            group_sizes = keep.sum(1)

        # index_fill_ with a Python scalar, not ``served[token_index] = True``: the latter copies the
        # value from the host and makes a CUDA stream wait.
        served = torch.zeros(n, dtype=torch.bool, device=logits.device).index_fill_(0, token_index, True)
        routing = Routing(token_index=token_index, group_sizes=group_sizes, combine_weights=combine, num_tokens=n,
                          dropped=torch.zeros(n, dtype=torch.bool, device=logits.device),
                          aux_losses={"z_loss": router_z_loss(logits, real)},
                          group_size=idx.shape[1] if fixed else None)
        routing.metrics = routing_metrics(probs, token_index, group_sizes, real, routing.dropped)
        routing.metrics["fraction_unserved"] = (real & ~served).sum() / real.sum().clamp(min=1)
        return routing

    def _per_sequence(self, scores: torch.Tensor, b: int, t: int):
        """Top-c of each sequence's tokens per expert. scores [b*t, e] -> vals, idx: [e, b*c]. Padding
        scores -inf and is dropped by the caller (c follows the full length)."""
        e = self.num_experts
        c = self.capacity(t)
        vals, which_t = _top_tokens(scores.view(b, t, e).transpose(1, 2), c)  # [b, e, c]
        tok = which_t + (torch.arange(b, device=scores.device) * t)[:, None, None]
        return vals.transpose(0, 1).reshape(e, b * c), tok.transpose(0, 1).reshape(e, b * c)

    def _per_position(self, scores: torch.Tensor, b: int, t: int, *, all_real: bool = False):
        """Top-c among the batch at each position. scores [b*t, e] -> vals, idx: [e, t*c]. Also moves
        the inference thresholds toward this batch's capacity boundaries (without reading anything
        back to the host when ``all_real``)."""
        e = self.num_experts
        c = self.capacity(b)
        per_pos = scores.view(b, t, e).permute(1, 2, 0)  # [t, e, b]
        vals, which_b = _top_tokens(per_pos, c)  # [t, e, c]
        tok = which_b * t + torch.arange(t, device=scores.device)[:, None, None]
        with torch.no_grad():
            boundary = vals[..., -1]  # [t, e], score of the c-th pick
            ok = torch.isfinite(boundary)
            # A block recomputed in backward (activation checkpointing) has moved them already.
            if not is_recomputing() and (all_real or ok.any()):
                mean_boundary = torch.where(ok, boundary, 0).sum(0) / ok.sum(0).clamp(min=1)
                # The first batch sets the thresholds, later ones move them (a select, not a branch
                # on the flag, so the device is not asked for it).
                ema = self.thresholds * self.momentum + (1 - self.momentum) * mean_boundary
                self.thresholds.copy_(torch.where(self.thresholds_seen, ema, mean_boundary))
                self.thresholds_seen.fill_(True)
        return vals.permute(1, 0, 2).reshape(e, -1), tok.permute(1, 0, 2).reshape(e, -1)

    def _thresholded(self, scores: torch.Tensor):
        """Inference: token i -> expert j iff S[i, j] >= threshold_j. Returns [e, n] with -inf for misses."""
        picked = scores.t() >= self.thresholds[:, None]  # [e, n]; -inf (padding) never passes
        idx = torch.arange(scores.shape[0], device=scores.device).expand_as(picked)
        vals = torch.where(picked, scores.t(), float("-inf"))
        return vals, idx
