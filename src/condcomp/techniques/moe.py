"""Mixture of experts in place of the FFN: token choice (Switch top-1, GShard top-2) or expert choice.

    model: {ffn: moe, moe: {num_experts: 8, router: top_k, k: 2, capacity_factor: 1.25}}
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from condcomp import registry
from condcomp.layers.feedforward import FeedForward
from condcomp.layers.moe import MoE
from condcomp.routing import ExpertChoiceRouter, TopKRouter
from condcomp.settings import ConfigError, Settings, setting


@dataclass
class MoESettings(Settings):
    """Settings of ``ffn: moe`` (section ``model.moe``)."""

    num_experts: int = setting(8, ge=1)
    router: str = setting("top_k", choices=("top_k", "expert_choice"))
    k: int = setting(1, ge=1, help="experts per token (top_k router)")
    capacity_factor: float | None = setting(1.25, gt=0.0, help="null = dropless (top_k only)")
    renormalize: bool | None = setting(None, help="top_k: rescale the k gates to sum to 1 (default: k > 1)")
    gate_scale: float = setting(1.0, gt=0.0, help="top_k: multiply the gate values by this (top-1 over E experts: "
                                                   "E starts the gate near 1 instead of 1/E)")
    jitter: float = setting(0.0, ge=0.0, lt=1.0)
    priority: str = setting("position_major", choices=("position_major", "rank_major"),
                            help="top_k overflow order; rank_major (GShard) reads future tokens: encoders only")
    expert_choice_mode: str = setting("per_position", choices=("per_position", "per_sequence", "global"),
                                      help="per_sequence (each sequence on its own) and global (the whole batch) "
                                           "read future tokens: image models and encoders only")
    d_ff: int | None = setting(None, ge=1, help="hidden size of each expert; default: the dense FFN's")
    activation: str = setting("swiglu", choices=("gelu", "swiglu"),
                              help="of the experts and of the dense FFN in the other layers; in a grid, the base "
                                   "model's dense FFN's unless the variant sets it")
    shared_expert_d_ff: int | None = setting(None, ge=1)
    moe_every: int = setting(1, ge=1, help="layer i is MoE when (i + 1) % moe_every == 0; others dense")
    layers: list[int] | None = setting(None, help="the MoE layers by index (from 0), instead of moe_every")

    def is_moe_layer(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` is an MoE (``layers`` if given, else every ``moe_every``-th)."""
        if self.layers is not None:
            return layer_idx in self.layers
        return (layer_idx + 1) % self.moe_every == 0

    def check(self) -> None:
        if self.router == "top_k" and self.k > self.num_experts:
            raise ConfigError(f"k: {self.k} exceeds num_experts={self.num_experts}")
        if self.router == "expert_choice" and self.gate_scale != 1.0:
            raise ConfigError("gate_scale: applies to the top_k router only; remove it for expert choice")
        if self.router == "expert_choice" and self.capacity_factor is None:
            raise ConfigError("capacity_factor: expert choice needs a number (2.0 = top-2 compute), not null")
        if self.layers is not None and (not self.layers or len(set(self.layers)) != len(self.layers)
                                        or min(self.layers) < 0):
            raise ConfigError(f"layers: expected distinct layer indices >= 0, got {self.layers}")

    @property
    def causal(self) -> bool:
        """Whether the router it builds never reads later positions (as the router declares)."""
        if self.router == "expert_choice":
            return self.expert_choice_mode == "per_position"
        return self.priority == "position_major" or self.capacity_factor is None


def _validate(model) -> None:
    m = model.moe
    if m.layers is not None and max(m.layers) >= model.n_layers:
        raise ConfigError(f"moe.layers: layer {max(m.layers)} is out of range; the model has layers "
                          f"0..{model.n_layers - 1}")
    if m.router == "expert_choice" and m.expert_choice_mode != "per_position":
        raise ConfigError(
            f"moe.expert_choice_mode: '{m.expert_choice_mode}' expert choice ranks tokens against future positions, "
            "so a decoder would learn to read the future; use expert_choice_mode: per_position")
    if not m.causal:
        raise ConfigError(
            "moe.priority: 'rank_major' keeps every first choice before any second choice, so whether an early "
            "token keeps its second expert depends on later tokens; a decoder would learn to read the future. "
            "Use priority: position_major (or capacity_factor: null)")


def build_router(*, d_model: int, settings: MoESettings):
    """The router ``settings`` describe, over ``settings.num_experts`` experts."""
    s = settings
    if s.router == "top_k":
        return TopKRouter(d_model=d_model, num_experts=s.num_experts, k=s.k, capacity_factor=s.capacity_factor,
                          renormalize=s.renormalize, jitter=s.jitter, priority=s.priority, gate_scale=s.gate_scale)
    return ExpertChoiceRouter(d_model=d_model, num_experts=s.num_experts, capacity_factor=s.capacity_factor,
                              mode=s.expert_choice_mode)


@registry.register("ffn", "moe", settings=MoESettings, summary="mixture of experts: top-k token choice or expert choice",
                   causal=lambda model: model.moe.causal, activation=lambda model: model.moe.activation,
                   aux_loss_weights={"load_balance": 0.01, "z_loss": 0.001}, validate=_validate)
def build(*, model, settings: MoESettings, layer_idx: int) -> nn.Module:
    """MoE on the chosen layers (``layers``, or every ``moe_every``-th), a dense FFN of the experts'
    activation elsewhere."""
    if not settings.is_moe_layer(layer_idx):
        return FeedForward(d_model=model.d_model, d_ff=model.ffn_hidden, activation=settings.activation,
                           dropout=model.dropout)
    router = build_router(d_model=model.d_model, settings=settings)
    return MoE(d_model=model.d_model, d_ff=settings.d_ff or model.ffn_hidden, num_experts=settings.num_experts,
               router=router, activation=settings.activation, shared_expert_d_ff=settings.shared_expert_d_ff)


registry.register_claim(
    "moe.expert_choice_steps", statement="{variant} reaches {baseline}'s final loss in <= 0.5x the steps",
    paper="Zhou et al., 2022: expert choice converges more than 2x faster than GShard top-2 in pretraining",
    test="steps_to_loss", view="steps", ratio=0.5)
registry.register_claim(
    "moe.beats_dense_per_step", statement="{variant} ends below {baseline} at equal steps and equal active compute",
    paper="Fedus et al., 2021 (Switch): at equal FLOPs per token, MoE beats dense per step (Switch-Base 7x "
          "faster to T5-Base's quality)",
    test="lower_loss", view="steps")
registry.register_claim(
    "moe.upcycled_beats_dense", statement="{variant} (upcycled) ends below {baseline} (dense, continued) at equal "
                                          "training FLOPs",
    paper="Komatsuzaki et al., 2022: sparse upcycling beats continued dense training for the same extra compute",
    test="lower_loss", view="flops")
