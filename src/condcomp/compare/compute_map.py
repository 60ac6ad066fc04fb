"""Where the compute went: which tokens each router sent to which groups, and what that costs.

``trace_routing`` runs a model once with hooks on every router and returns what each decided, so a
report can shade text by the computation each byte received, draw per-layer expert loads and count
the parameters a token actually uses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from condcomp.routing import Router


@dataclass
class RouterTrace:
    """name: the router's module path; owner: its parent module; units: [n] assignments per token;
    group_sizes: [groups] tokens per group (expert loads)."""

    name: str
    owner: nn.Module
    attr: str
    units: torch.Tensor
    group_sizes: torch.Tensor


@torch.no_grad()
def trace_routing(model: nn.Module, tokens: torch.Tensor) -> list[RouterTrace]:
    """Run ``model(tokens)`` in its current mode and record every router's decisions."""
    modules = dict(model.named_modules())
    traces: list[RouterTrace] = []
    hooks = []
    for name, module in modules.items():
        if isinstance(module, Router):
            parent_name, _, attr = name.rpartition(".")

            def hook(mod, args, routing, name=name, owner=modules[parent_name], attr=attr):
                units = torch.bincount(routing.token_index, minlength=routing.num_tokens)
                traces.append(RouterTrace(name, owner, attr, units, routing.group_sizes.clone()))

            hooks.append(module.register_forward_hook(hook))
    try:
        model(tokens)
    finally:
        for h in hooks:
            h.remove()
    return traces


def conditional_parameters(trace: RouterTrace) -> tuple[int, float]:
    """(parameters behind this router, fraction of them an average token uses), as the router's
    owner declares in ``routed_parameters()``; (0, 1.0) for a router whose owner declares none."""
    declared = getattr(trace.owner, "routed_parameters", None)
    routed = declared().get(trace.attr) if declared is not None else None
    if routed is None:
        return 0, 1.0
    per_token = float(trace.units.sum()) / max(1, trace.units.numel())  # assignments per token
    return routed.count, per_token / routed.groups


def active_parameters(model: nn.Module, traces: list[RouterTrace]) -> int:
    """Parameters an average token touches: all, minus the unused share of every conditional part."""
    total = sum(p.numel() for p in model.parameters())
    for tr in traces:
        params, used = conditional_parameters(tr)
        total -= round(params * (1.0 - min(1.0, used)))
    return total


def compute_per_token(traces: list[RouterTrace], n: int) -> torch.Tensor:
    """[n] conditional computations each token received (experts, blocks, heavy branches), summed
    over layers; zeros for a dense model."""
    out = torch.zeros(n)
    for tr in traces:
        out += tr.units.float()
    return out
