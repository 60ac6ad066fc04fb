"""Binary run/skip gate per token (Learning to Skip, Zeng et al., 2023)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from condcomp.routing.base import Router, RouterTokens
from condcomp.routing.types import Routing, RoutingError


class BinaryGate(Router):
    """Each token decides alone whether a computation runs on it: causal by construction.

    Logits = Linear(d -> 2)(x) for (skip, run). Training: straight-through Gumbel-softmax — the
    forward decision is hard (combine weight exactly 1 for tokens that run), the backward uses the
    soft probability, so the gate learns from the task loss. Inference (``eval()``): argmax.

    Aux loss "skip_rate": (realised run rate - target_rate)^2 over real tokens (differentiable through
    the straight-through weights); weight it with train.aux_loss_weights.skip_rate (beta).

    Args:
        d_model: input size. target_rate: desired fraction of tokens that run, in (0, 1].
        temperature: Gumbel-softmax temperature (> 0).
        init_run_bias: initial logit bias towards running (tokens start by running the block).
    """

    aux_loss_names = ("skip_rate",)
    owns_init = True  # the model's generic init must not overwrite the run bias

    def __init__(self, *, d_model: int, target_rate: float, temperature: float = 1.0, init_run_bias: float = 2.0):
        super().__init__(d_model=d_model)
        if not 0 < target_rate <= 1:
            raise RoutingError(f"target_rate must be in (0, 1] (fraction of tokens that run), got {target_rate}")
        if temperature <= 0:
            raise RoutingError(f"temperature must be > 0, got {temperature}")
        self.target_rate, self.temperature = target_rate, temperature
        self.gate = nn.Linear(d_model, 2)
        self.init_run_bias = init_run_bias
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.gate.weight, std=0.02)
        with torch.no_grad():
            self.gate.bias.copy_(torch.tensor([0.0, self.init_run_bias]))

    def start_like_dense(self, run_bias: float = 5.0) -> None:
        """Wrapped around pretrained blocks: decide by a bias alone at first, so every token runs the
        block at inference and, in training, sigmoid(5) = 99.3% do (a pretrained stack is hurt by
        every skipped block: 12% skips per block, the default bias, cost SmolLM2 4.5 nats)."""
        with torch.no_grad():
            self.gate.weight.zero_()
            self.gate.bias.copy_(torch.tensor([0.0, run_bias]))

    def select(self, logits: torch.Tensor, tokens: RouterTokens) -> Routing:
        real, n = tokens.real, tokens.num_tokens
        if self.training:
            run_w = F.gumbel_softmax(logits, tau=self.temperature, hard=True)[:, 1]  # 0/1, soft grad
        else:
            run_w = (logits[:, 1] > logits[:, 0]).to(logits.dtype)
        run_w = run_w * real
        rate = run_w.sum() / real.sum().clamp(min=1)
        token_index = (run_w > 0).nonzero().squeeze(1)
        return Routing(token_index=token_index, group_sizes=token_index.new_tensor([token_index.numel()]),
                       combine_weights=run_w.index_select(0, token_index), num_tokens=n,
                       dropped=torch.zeros(n, dtype=torch.bool, device=logits.device),
                       aux_losses={"skip_rate": (rate - self.target_rate) ** 2},
                       metrics={"fraction_selected": rate.detach(),
                                "run_probability": (logits.softmax(-1)[:, 1] * real).sum().detach() / real.sum().clamp(min=1)})
