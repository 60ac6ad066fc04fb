"""Layer traits: what a layer declares about itself, once, so that the model, trainer, compute map
and config ask the layer instead of keeping lists of names or testing types.

Every layer a technique builds returns ``(y, LayerInfo)`` from ``forward`` and may declare:

    causal: bool               at inference no output depends on a later position (default True).
    causal_in_training: bool   the same in training mode (default: ``causal``).
    selects_tokens: bool       some tokens may skip part of the layer in a step, leaving those
                               parameters without gradient (DDP must then look for unused ones).
    supports_cache: bool       decodes incrementally with a key/value cache (attention and blocks).
    aux_loss_names: tuple      names of the aux losses its LayerInfo may carry (the trainer checks
                               each has a weight before the first step).
    routed_parameters() -> dict[router attribute, RoutedParameters]
                               the parameters behind each of its routers (for active-parameter counts).
    owns_init: bool            the model calls its ``reset_parameters`` after the generic init.
    added_parameters: tuple    names of its parameters a dense layer has no counterpart for (SPLA's
                               log_alpha): loading pretrained dense weights leaves them as initialised.
    start_like_dense()         (routers) called when the layer wraps pretrained dense blocks: start as
                               close to the dense computation as the technique allows.

The helpers below read these over a whole model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from condcomp.layers.info import LayerInfo


@dataclass(frozen=True)
class RoutedParameters:
    """Parameters behind one router. A token assigned to ``a`` of the ``groups`` groups (experts)
    uses a / groups of the ``count`` parameters."""

    count: int
    groups: int = 1


@runtime_checkable
class ConditionalLayer(Protocol):
    """The interface of a layer that spends compute conditionally (see the module docstring)."""

    causal: bool
    causal_in_training: bool
    selects_tokens: bool
    aux_loss_names: tuple[str, ...]

    def routed_parameters(self) -> dict[str, RoutedParameters]: ...

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, LayerInfo]: ...


def count_parameters(*modules: nn.Module) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


def look_ahead_modules(model: nn.Module, *, training: bool = False) -> list[tuple[str, nn.Module]]:
    """(name, module) of every module that declares it reads later positions (at inference, or in
    training with ``training=True``)."""
    attr = "causal_in_training" if training else "causal"
    return [(name, m) for name, m in model.named_modules() if getattr(m, attr, True) is False]


def selects_tokens(model: nn.Module) -> bool:
    """Whether any layer may leave some of its parameters without tokens in a step."""
    return any(getattr(m, "selects_tokens", False) for m in model.modules())


def aux_loss_names(model: nn.Module) -> set[str]:
    """Names of every aux loss the model's layers may return."""
    names: set[str] = set()
    for m in model.modules():
        names.update(getattr(m, "aux_loss_names", ()))
    return names


class RouterTraits:
    """Mixin for a layer with one router in ``self.router``: its causality and aux losses are the router's."""

    @property
    def causal(self) -> bool:
        return self.router.causal

    @property
    def causal_in_training(self) -> bool:
        return self.router.causal_in_training

    @property
    def aux_loss_names(self) -> tuple[str, ...]:
        return self.router.aux_loss_names
