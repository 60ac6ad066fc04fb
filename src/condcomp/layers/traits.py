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
    calibrate(x, padding_mask) fit its added parameters to its input x [b, t, d] once pretrained dense
                               weights are loaded (SPLA's per-head residual weight); see
                               ``calibrate_added_parameters``.
    reads_prompt: int          its output at positions before ``reads_prompt - 1`` depends on the rest of
                               a prompt of that many tokens (input-conditioned pruning picks channels
                               from the whole prompt); the trainer and evaluation score later positions
                               only. From there on the layer is causal.
    set_progress(fraction)     the trainer tells it how far training is (0..1) before each step (for
                               schedules such as a sparsity ramp).
    calibration_shifts: tuple  shifts of the calibrated parameters to try end to end afterwards, and
    shift_calibration(delta)   applying one (a layer-local fit can be biased for the whole model).

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


def prompt_length(model: nn.Module) -> int:
    """The longest prompt any layer reads whole (``reads_prompt``), 0 when none does: positions
    before ``prompt_length - 1`` are not causal and are left out of losses."""
    return max((int(getattr(m, "reads_prompt", 0)) for m in model.modules()), default=0)


def set_training_progress(model: nn.Module, fraction: float) -> None:
    """Tell every layer with a training schedule (``set_progress``) how far training is, 0..1."""
    for m in model.modules():
        if callable(getattr(m, "set_progress", None)):
            m.set_progress(fraction)


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


def calibrate_added_parameters(model: nn.Module, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fit the parameters layers add to a pretrained dense model, on token ids ``tokens`` [b, t]
    (no gradient, the model's dtype, eval mode). Two stages:

    1. Layer by layer: run the model once and let every layer with a ``calibrate`` method fit itself
       to the input it receives, in order (a layer sees the earlier layers already calibrated).
    2. End to end: a fit that is optimal for each layer's own output need not be for the model's
       predictions, so every shift the calibrated layers offer (``calibration_shifts``, the same one
       for all of them) is tried and the one with the lowest next-token loss on ``tokens`` is kept.

    Returns {module name: its calibrated parameters} (empty when no layer calibrates).
    """
    layers = [(name, m) for name, m in model.named_modules() if callable(getattr(m, "calibrate", None))]
    fitted: dict[str, torch.Tensor] = {}

    def hook_for(name):
        def hook(module, args, kwargs):
            x = args[0]
            result = module.calibrate(x, kwargs.get("padding_mask", args[1] if len(args) > 1 else None))
            if result is not None:
                fitted[name] = result

        return hook

    if not layers:
        return fitted
    was_training = model.training
    model.eval()
    try:
        handles = [m.register_forward_pre_hook(hook_for(name), with_kwargs=True) for name, m in layers]
        try:
            with torch.no_grad():
                model(tokens)
        finally:
            for handle in handles:
                handle.remove()
        shifting = [m for name, m in layers if name in fitted and getattr(m, "calibration_shifts", ())]
        if shifting:
            _best_common_shift(model, tokens, shifting)
            fitted = {name: m.calibrate_result() for name, m in layers if name in fitted}
    finally:
        model.train(was_training)
    return fitted


@torch.no_grad()
def _best_common_shift(model: nn.Module, tokens: torch.Tensor, layers: list[nn.Module]) -> float:
    """Apply to ``layers`` the shift (from their ``calibration_shifts``) with the lowest next-token
    cross-entropy of ``model`` on ``tokens``; returns it."""
    import torch.nn.functional as F

    def loss() -> float:
        logits = model(tokens).logits[:, :-1].float()
        return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)))

    applied, best, best_loss = 0.0, 0.0, loss()
    for delta in layers[0].calibration_shifts:
        if delta == 0:
            continue
        for m in layers:
            m.shift_calibration(delta - applied)
        applied = delta
        value = loss()
        if value < best_loss:
            best, best_loss = delta, value
    for m in layers:
        m.shift_calibration(best - applied)
    return best
