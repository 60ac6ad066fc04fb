"""Choosing feed-forward channels: per input (a predictor that reads the prompt), for every input
(hard-concrete L0 gates, CoFi's static structured pruning), or by weight magnitude (the trivial
baseline). The layer that applies a choice is ``condcomp.layers.PrunableFeedForward``.

Input-conditioned pruning (Hou et al., 2025) decides once per prompt which channels of every FFN
stay; the kept rows and columns are then gathered into a compact dense FFN for the prompt and every
generated token. ``ChannelMaskPredictor`` reads the mean-pooled hidden state of the prompt after
the model's first ``read_layers`` layers (which stay dense): no second encoder to run, and those
states exist anyway during prefill. Training uses ``soft_top_k`` at the target sparsity (weights in
[0, 1] summing to the kept count, differentiable); inference keeps the hard top-k.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import nn

from condcomp.routing.soft_top_k import soft_top_k
from condcomp.routing.types import RoutingError


def kept_channels(d_ff: int, sparsity: float) -> int:
    """Channels kept at ``sparsity`` (the pruned share), at least one."""
    if not 0.0 <= sparsity < 1.0:
        raise RoutingError(f"sparsity must be in [0, 1) (the share of FFN channels pruned), got {sparsity}")
    return max(1, round((1.0 - sparsity) * d_ff))


def hard_channel_mask(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` best channels: scores [..., d_ff] -> bool [..., d_ff] with exactly ``keep`` True
    per row (ties to the lower index)."""
    if not 1 <= keep <= scores.shape[-1]:
        raise RoutingError(f"keep must be in 1..{scores.shape[-1]}, got {keep}")
    order = scores.argsort(dim=-1, descending=True, stable=True)[..., :keep]
    return torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, order, True)


def at_least_one(mask: torch.Tensor, scores: torch.Tensor | None = None, *, where: str = "a layer") -> torch.Tensor:
    """A mask [..., d_ff] whose rows keep at least one channel: an empty row keeps its best-scoring
    channel (channel 0 without scores), with a warning naming ``where``."""
    empty = ~mask.any(-1)
    if not empty.any():
        return mask
    warnings.warn(f"{where}: a channel mask kept no channel; keeping the best-scoring one so the FFN still "
                  "runs (raise the kept share if this happens often)", stacklevel=2)
    best = (scores if scores is not None else torch.zeros(mask.shape, device=mask.device)).argmax(-1, keepdim=True)
    return mask | (empty[..., None] & torch.zeros_like(mask).scatter_(-1, best, True))


class ChannelMaskPredictor(nn.Module):
    """Per-layer FFN channel scores from a prompt.

    forward(hidden [b, t, d_model], prompt_mask [b, t] bool (True = prompt token)) -> scores
    [b, n_layers, d_ff]: an MLP on the mean of ``hidden`` over the prompt tokens only, so the
    scores are a function of the prompt alone (later tokens never change them).
    ``mask(scores, sparsity)``: soft top-k weights in training, hard bool masks in eval.
    """

    def __init__(self, *, d_model: int, d_ff: int, n_layers: int, hidden: int = 256, min_prompt: int = 1):
        super().__init__()
        if min_prompt < 1:
            raise RoutingError(f"min_prompt must be >= 1, got {min_prompt}")
        self.d_ff, self.n_layers, self.min_prompt = d_ff, n_layers, min_prompt
        self.net = nn.Sequential(nn.LayerNorm(d_model), nn.Linear(d_model, hidden), nn.GELU(),
                                 nn.Linear(hidden, n_layers * d_ff))

    def forward(self, hidden: torch.Tensor, prompt_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, t, _ = hidden.shape
        if prompt_mask is None:
            prompt_mask = torch.ones(b, t, dtype=torch.bool, device=hidden.device)
        counts = prompt_mask.sum(-1)
        if int(counts.min()) < self.min_prompt:
            raise RoutingError(f"the prompt has {int(counts.min())} tokens but the channel predictor needs at least "
                               f"{self.min_prompt}; give a longer prompt")
        w = prompt_mask.to(hidden.dtype)[..., None]
        pooled = (hidden * w).sum(1) / counts[:, None].to(hidden.dtype)
        return self.net(pooled).view(b, self.n_layers, self.d_ff)

    def mask(self, scores: torch.Tensor, sparsity: float) -> torch.Tensor:
        """Training: soft top-k weights [b, L, d_ff] in [0, 1] summing to the kept count; eval: the
        hard top-k as bool."""
        keep = kept_channels(self.d_ff, sparsity)
        if self.training:
            return soft_top_k(scores.float(), keep) if keep < self.d_ff else torch.ones_like(scores)
        return hard_channel_mask(scores, keep)


class HardConcreteGates(nn.Module):
    """Hard-concrete L0 gates over ``n`` channels (Louizos et al., 2018; CoFi): one learned mask for
    every input. A sample is z = clamp(sigmoid((log u - log(1 - u) + log_alpha) / beta) (zeta - gamma)
    + gamma, 0, 1), u ~ U(0, 1), so a gate is exactly 0 with positive probability and

        P(z > 0) = sigmoid(log_alpha - beta log(-gamma / zeta))

    is the expected share of channels kept (``expected_kept``), which the Lagrangian drives to the
    target. In eval the gate is deterministic: the channels with the highest log_alpha, as many as
    the target keeps (CoFi keeps the expected count; a fixed count makes the compact FFN's size exact).
    """

    def __init__(self, n: int, *, beta: float = 2.0 / 3.0, gamma: float = -0.1, zeta: float = 1.1,
                 init_keep: float = 0.9):
        super().__init__()
        if not (gamma < 0 < 1 < zeta) or beta <= 0:
            raise RoutingError(f"hard-concrete needs gamma < 0, zeta > 1, beta > 0; got {gamma}, {zeta}, {beta}")
        self.beta, self.gamma, self.zeta = beta, gamma, zeta
        # log_alpha such that P(z > 0) = init_keep at the start.
        start = math.log(init_keep / (1 - init_keep)) + beta * math.log(-gamma / zeta)
        self.log_alpha = nn.Parameter(torch.full((n,), start))

    def expected_kept(self) -> torch.Tensor:
        """[n]: P(z > 0) per channel."""
        return torch.sigmoid(self.log_alpha - self.beta * math.log(-self.gamma / self.zeta))

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """One training sample of the gates, [n] in [0, 1] (differentiable in log_alpha)."""
        u = torch.rand(self.log_alpha.shape, generator=generator).clamp(1e-6, 1 - 1e-6).to(self.log_alpha)
        s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + self.log_alpha) / self.beta)
        return (s * (self.zeta - self.gamma) + self.gamma).clamp(0.0, 1.0)

    def lagrangian(self, target_sparsity: float, lambda1: torch.Tensor, lambda2: torch.Tensor) -> torch.Tensor:
        """CoFi's penalty lambda1 (s - t) + lambda2 (s - t)^2 with s the expected sparsity; the
        lambdas are maximised (trained with flipped gradients) while the gates minimise."""
        gap = (1.0 - self.expected_kept().mean()) - target_sparsity
        return lambda1 * gap + lambda2 * gap * gap

    def deterministic_mask(self, sparsity: float) -> torch.Tensor:
        """bool [n]: the channels kept at ``sparsity`` after training."""
        return hard_channel_mask(self.log_alpha.detach(), kept_channels(self.log_alpha.numel(), sparsity))


def magnitude_scores(up: torch.Tensor, down: torch.Tensor, activation: str) -> torch.Tensor:
    """Static channel importance from weights alone: |rows of up| x |column of down|. up: [width, d]
    (width = 2 d_ff for SwiGLU: gate rows then up rows), down: [d, d_ff]. Returns [d_ff]."""
    d_ff = down.shape[1]
    rows = up.view(2, d_ff, -1).transpose(0, 1).reshape(d_ff, -1) if activation == "swiglu" else up
    return rows.norm(dim=-1) * down.norm(dim=0)
