"""No look-ahead, proven on whole models: for every router and every setting it accepts, perturb only
the future (of all sequences, of one sequence, and which future tokens are padding) and require the
earlier logits to be unchanged — exactly when the router declares itself causal for that mode.

Settings are chosen so that routing is tight at the positions tested (small capacity factors drop
tokens from the first positions on), so a router that reads the future is caught, and a router
declared non-causal must show a leak here too: the declaration and the behaviour agree both ways.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

from condcomp import routing as routing_pkg
from condcomp.config import ModelConfig, from_dict
from condcomp.layers import ConditionalAttention, ConditionalFeedForward, MoE, SelectedBlock
from condcomp.models import Transformer
from condcomp.routing import BinaryGate, ExpertChoiceRouter, Router, TokenSelectRouter, TopKRouter

D, E, B, T = 16, 4, 3, 12


def _top_k(**kw):
    return ("moe", lambda: TopKRouter(d_model=D, num_experts=E, **kw))


def _expert_choice(**kw):
    return ("moe", lambda: ExpertChoiceRouter(d_model=D, num_experts=E, **kw))


def _select(place, **kw):
    return (place, lambda: TokenSelectRouter(d_model=D, **kw))


CASES = {}
for k in (1, 2, 3):
    for cf in (0.25, 0.5, None):
        for priority in ("position_major", "rank_major"):
            for jitter in ((0.0, 0.1) if k == 2 else (0.0,)):
                CASES[f"top_k-k{k}-cf{cf}-{priority}-jitter{jitter}"] = _top_k(
                    k=k, capacity_factor=cf, priority=priority, jitter=jitter)
for mode in ("per_position", "global"):
    for cf in (0.5, 1.0, 2.0):
        CASES[f"expert_choice-{mode}-cf{cf}"] = _expert_choice(capacity_factor=cf, mode=mode)
for weighting, scheme in (("soft_top_k", None), ("sigmoid", None), ("sigmoid", "aux_loss"), ("sigmoid", "predictor")):
    for capacity in (0.25, 0.5):
        for place in ("mod", "colt5_ffn", "colt5_attention"):
            CASES[f"token_select-{place}-{weighting}-{scheme}-cap{capacity}"] = _select(
                place, capacity=capacity, weighting=weighting, causal_scheme=scheme)
for rate in (0.25, 0.75):
    CASES[f"binary_gate-rate{rate}"] = ("skip", lambda rate=rate: BinaryGate(d_model=D, target_rate=rate))


def _model_with(place: str, make_router) -> Transformer:
    """A tiny float64 decoder whose routers of the given place are all built by ``make_router``."""
    base = dict(d_model=D, n_layers=2, n_heads=2, seq_len=T)
    shape = {"moe": dict(ffn="moe", moe={"num_experts": E, "d_ff": 16}),
             "mod": dict(block="mod", mod={"every": 1}),
             "skip": dict(block="skip"),
             "colt5_ffn": dict(ffn="conditional"),
             "colt5_attention": dict(attention="conditional")}[place]
    torch.manual_seed(0)
    model = Transformer(from_dict(ModelConfig, {**base, **shape}))
    for module in model.modules():
        if isinstance(module, (MoE, SelectedBlock, ConditionalFeedForward)):
            module.router = make_router()
        elif isinstance(module, ConditionalAttention):
            module.q_router, module.kv_router = make_router(), make_router()
    model.double()
    # One training step's forward sets the expert-choice inference thresholds to something real.
    model.train()
    with torch.no_grad():
        model(torch.randint(0, 256, (B, T), generator=torch.Generator().manual_seed(99)))
    return model


def _logits(model, tokens, real, seed):
    torch.manual_seed(seed)  # the same jitter / Gumbel noise for both runs
    with torch.no_grad():
        return copy.deepcopy(model)(tokens, padding_mask=real).logits


def _largest_leak(model, training: bool) -> float:
    """Max change of any real logit at positions <= t0 when only positions > t0 change, over a battery
    of perturbations: future tokens of every sequence, of one sequence, and future padding."""
    model.train(training)
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for trial in range(12):
        t0 = 1 + trial % (T - 3)
        tokens = torch.randint(0, 256, (B, T), generator=g)
        real = torch.ones(B, T, dtype=torch.bool)
        if trial % 3 == 2:  # some sequences end in padding after t0
            for row in range(B):
                real[row, t0 + 1 + int(torch.randint(0, T - t0, (1,), generator=g)):] = False
        changed, changed_real = tokens.clone(), real.clone()
        rows = [trial % B] if trial % 3 == 1 else list(range(B))
        for row in rows:
            changed[row, t0 + 1:] = torch.randint(0, 256, (T - t0 - 1,), generator=g)
        if trial % 3 == 2:
            changed_real[:, t0 + 1:] = torch.rand(B, T - t0 - 1, generator=g) < 0.5
        before = _logits(model, tokens, real, seed=trial)
        after = _logits(model, changed, changed_real, seed=trial)
        past = real[:, : t0 + 1]
        worst = max(worst, float((before[:, : t0 + 1] - after[:, : t0 + 1]).abs()[past].max()))
    return worst


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_declared_causality_matches_what_the_model_does(case, training):
    place, make_router = CASES[case]
    router = make_router()
    declared = router.causal_in_training if training else router.causal
    leak = _largest_leak(_model_with(place, make_router), training)
    if declared:
        assert leak <= 1e-9, f"{case}: declared causal but earlier logits moved by {leak:.3g} when only the future changed"
    else:
        assert leak > 1e-6, f"{case}: declared non-causal, but no perturbation of the future moved an earlier logit"


def test_every_router_in_the_package_is_covered():
    routers = {cls for _, cls in inspect.getmembers(routing_pkg, inspect.isclass)
               if issubclass(cls, Router) and cls is not Router}
    covered = {type(CASES[c][1]()) for c in CASES}
    assert routers <= covered, f"add causality cases for {sorted(r.__name__ for r in routers - covered)}"


def test_decoders_refuse_rank_major_capacity_at_config_load():
    from condcomp.config import ConfigError
    with pytest.raises(ConfigError, match="rank_major"):
        from_dict(ModelConfig, {"ffn": "moe", "moe": {"k": 2, "priority": "rank_major"}})
    # Dropless rank-major drops nothing, so its order cannot leak: allowed.
    from_dict(ModelConfig, {"ffn": "moe", "moe": {"k": 2, "priority": "rank_major", "capacity_factor": None}})
