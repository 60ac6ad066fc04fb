"""FFN channel pruning: input-conditioned (a predictor reads the prompt and picks the channels, Hou et
al., 2025), static with hard-concrete L0 gates (CoFi, Xia et al., 2022), or by weight magnitude.

    model: {ffn: prunable, prunable: {method: conditioned, sparsity: 0.5, prompt_len: 64}}

Every method keeps ``FeedForward``'s parameters under the same names, so a dense model's weights load
unchanged (``condcomp train --init <dense>``, or ``condcomp prune train``), and every method ends in a
compact dense FFN: ``condcomp.convert.prune`` gathers the kept channels (per prompt for
``conditioned``, once for the static methods).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from condcomp import registry
from condcomp.layers.prunable_ffn import L0PrunedFeedForward, MagnitudePrunedFeedForward, PromptPrunedFeedForward
from condcomp.settings import ConfigError, Settings, setting

METHODS = ("conditioned", "static", "magnitude")


@dataclass
class PrunableSettings(Settings):
    """Settings of ``ffn: prunable`` (section ``model.prunable``)."""

    method: str = setting("conditioned", choices=METHODS,
                          help="conditioned: channels chosen per prompt; static: one learned L0 mask for every "
                               "input (CoFi); magnitude: one mask by |up rows| x |down column|")
    sparsity: float = setting(0.5, gt=0.0, lt=1.0, help="share of each FFN's hidden channels pruned")
    activation: str = setting("swiglu", choices=("swiglu", "gelu"), help="the dense FFN's activation")
    ramp: float = setting(0.3, ge=0.0, le=1.0,
                          help="share of training over which the sparsity rises linearly from 0 to its target")
    prompt_len: int = setting(64, ge=1, help="conditioned: tokens at the start of each sequence the predictor reads "
                                             "(the loss starts at the prompt's last position)")
    predictor_hidden: int = setting(64, ge=1, help="conditioned: hidden width of each layer's mask predictor")
    predictor_lr_scale: float = setting(1.0, gt=0.0, help="conditioned: the predictors train at train.lr times this")
    lagrangian_lr: float = setting(0.5, gt=0.0, help="static: dual-ascent step of the L0 Lagrange multipliers")
    gate_lr_scale: float = setting(50.0, gt=0.0, help="static: the gate logits train at train.lr times this")
    gate_init: str = setting("uniform", choices=("uniform", "magnitude"),
                             help="static: gates start equal (CoFi), or ranked by the loaded weights' magnitude")


def _validate(model) -> None:
    s = model.prunable
    if s.method == "conditioned" and s.prompt_len >= model.seq_len:
        raise ConfigError(f"prunable.prompt_len: {s.prompt_len} leaves no position to predict in model.seq_len="
                          f"{model.seq_len}; use a prompt shorter than the sequence")
    if model.block not in ("transformer", "parallel"):
        raise ConfigError(f"ffn: prunable needs block: transformer or parallel, got block: {model.block}")


@registry.register("ffn", "prunable", settings=PrunableSettings, validate=_validate,
                   activation=lambda model: model.prunable.activation, aux_loss_weights={"l0_lagrangian": 1.0},
                   summary="FFN channel pruning: per-prompt predicted masks, static L0 gates or magnitude")
def build(*, model, settings: PrunableSettings, layer_idx: int) -> nn.Module:
    common = dict(d_model=model.d_model, d_ff=model.ffn_hidden, activation=settings.activation,
                  sparsity=settings.sparsity, ramp=settings.ramp, dropout=model.dropout)
    if settings.method == "magnitude":
        return MagnitudePrunedFeedForward(**common)
    if settings.method == "static":
        return L0PrunedFeedForward(lagrangian_lr=settings.lagrangian_lr, gate_lr_scale=settings.gate_lr_scale,
                                   gate_init=settings.gate_init, **common)
    return PromptPrunedFeedForward(prompt_len=settings.prompt_len, predictor_hidden=settings.predictor_hidden,
                                   predictor_lr_scale=settings.predictor_lr_scale, **common)
