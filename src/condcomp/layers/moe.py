"""Mixture-of-experts feed-forward layer."""

from __future__ import annotations

import torch
from torch import nn

from condcomp.dispatch import dispatch
from condcomp.dispatch.expert_parallel import ExpertPlacement, dispatch_expert_parallel
from condcomp.layers.experts import Experts
from condcomp.layers.feedforward import FeedForward
from condcomp.layers.info import LayerInfo
from condcomp.layers.traits import RoutedParameters, RouterTraits, count_parameters
from condcomp.routing import Router, RoutingError, TopKRouter


class MoE(RouterTraits, nn.Module):
    """y = sum over the experts routed to each token of weight * expert(x) (+ shared expert(x)).

        moe = MoE(d_model=512, d_ff=2048, num_experts=8,
                  router=TopKRouter(d_model=512, num_experts=8, k=2, capacity_factor=1.25))
        y, info = moe(x)                  # x: [batch, seq, 512] -> y: same shape
        loss = task_loss + 0.01 * info.aux_losses["load_balance"]

    Args:
        d_model, d_ff, num_experts: sizes of each expert FFN.
        router: a Router with ``num_experts`` groups built for d_model (TopKRouter, ExpertChoiceRouter);
            default Switch top-1 with capacity factor 1.25.
        activation: "gelu" or "swiglu" for the experts.
        shared_expert_d_ff: if set, a dense FFN of that width runs on every token and is added.
    Returns (y, LayerInfo): the router's aux losses (load_balance, z_loss) and routing metrics
    (tokens_per_expert, fraction_dropped, experts_per_token_hist, router_entropy).

    Expert parallelism: ``condcomp.distributed.shard_experts`` keeps only this rank's block of experts
    in ``self.experts`` and sets ``self.placement``; forward then exchanges tokens with the other
    ranks (a collective: all ranks of the group call forward together). Routing stays per rank.
    """

    def __init__(self, *, d_model: int, d_ff: int, num_experts: int, router: Router | None = None,
                 activation: str = "gelu", shared_expert_d_ff: int | None = None):
        super().__init__()
        router = router if router is not None else TopKRouter(d_model=d_model, num_experts=num_experts)
        if not isinstance(router, Router) or not hasattr(router, "num_experts"):
            raise RoutingError(f"router must be a Router over experts (TopKRouter, ExpertChoiceRouter), "
                               f"got {type(router).__name__}")
        if router.d_model != d_model or router.num_experts != num_experts:
            raise RoutingError(f"router was built for d_model={router.d_model}, num_experts={router.num_experts} "
                               f"but the MoE has d_model={d_model}, num_experts={num_experts}")
        self.d_model = d_model
        self.router = router
        self.experts = Experts(num_experts=num_experts, d_model=d_model, d_ff=d_ff, activation=activation)
        self.placement: ExpertPlacement | None = None
        self.shared = (FeedForward(d_model=d_model, d_ff=shared_expert_d_ff, activation=activation)
                       if shared_expert_d_ff else None)

    selects_tokens = False  # every expert runs each step (possibly on no tokens), so all get gradients

    def routed_parameters(self) -> dict[str, RoutedParameters]:
        return {"router": RoutedParameters(count_parameters(self.experts), groups=self.router.num_experts)}

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerInfo]:
        """x: [batch, seq, d_model] or [n, d_model]; padding_mask: leading shape of x, True = real."""
        routing = self.router(x, padding_mask)
        flat = x.reshape(-1, self.d_model)
        shared = self.shared(flat)[0] if self.shared is not None else None
        if self.placement is None:
            y = dispatch(flat, routing, self.experts.groups(), into=shared)
        else:
            y = dispatch_expert_parallel(flat, routing, self.experts, self.placement)
            y = y if shared is None else y + shared
        return y.view(x.shape[:-1] + (y.shape[-1],)), LayerInfo(aux_losses=routing.aux_losses, metrics=routing.metrics)
