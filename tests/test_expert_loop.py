"""layers.expert_loop: the one-node expert loop against the per-expert autograd loop (its twin)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from condcomp.dispatch import grouped
from condcomp.layers.expert_loop import ExpertLoop
from condcomp.layers.experts import Experts


def _experts(e, activation, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return Experts(num_experts=e, d_model=6, d_ff=5, activation=activation).to(dtype)


def _run_and_grads(experts, xs, fn, grad):
    experts.zero_grad()
    xs = xs.detach().requires_grad_()
    ys = fn(xs)
    ys.backward(grad)
    return [ys.detach(), xs.grad, experts.up.grad, experts.down.grad]


def _reference(experts, sizes):
    return lambda xs: torch.cat([experts(g, chunk) for g, chunk in enumerate(xs.split(sizes))])


@settings(max_examples=30, deadline=None)
@given(sizes=st.lists(st.integers(0, 5), min_size=1, max_size=5).filter(lambda s: sum(s) > 0),
       activation=st.sampled_from(["swiglu", "gelu"]), seed=st.integers(0, 1000))
def test_expert_loop_equals_per_expert_autograd_loop(sizes, activation, seed):
    """Property: outputs and the input and weight gradients equal the per-expert loop's (float64),
    including experts with no rows (their weight gradients are zero)."""
    experts = _experts(len(sizes), activation, seed=seed)
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(sum(sizes), 6, generator=g, dtype=torch.float64)
    grad = torch.randn(sum(sizes), 6, generator=g, dtype=torch.float64)
    ours = _run_and_grads(experts, xs, lambda x: experts.looped(x, sizes), grad)
    ref = _run_and_grads(experts, xs, _reference(experts, sizes), grad)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b)
    for g_idx, m in enumerate(sizes):
        if m == 0:
            assert not ours[2][g_idx].any() and not ours[3][g_idx].any()


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_expert_loop_gradcheck(activation):
    experts = _experts(3, activation)
    xs = torch.randn(7, 6, dtype=torch.float64, requires_grad=True)
    up, down = experts.up.detach().requires_grad_(), experts.down.detach().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, u, d: ExpertLoop.apply(x, u, d, (3, 0, 4), activation, torch.float64), (xs, up, down))


def test_expert_loop_under_bf16_autocast_matches_the_autograd_loop():
    """Under autocast both compute in bf16 from fp32 parameters; the results and the fp32 weight
    gradients agree to bf16 rounding, and the gradients keep the parameters' dtype."""
    experts = _experts(4, "swiglu", dtype=torch.float32)
    sizes = [9, 0, 5, 12]
    xs = torch.randn(26, 6)
    grad = torch.randn(26, 6).bfloat16()

    def under_autocast(fn):
        def run(x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return fn(x)
        return run

    ours = _run_and_grads(experts, xs, under_autocast(lambda x: experts.looped(x, sizes)), grad)
    ref = _run_and_grads(experts, xs, under_autocast(_reference(experts, sizes)), grad)
    assert ours[0].dtype == torch.bfloat16 and ours[2].dtype == torch.float32 and ours[1].dtype == torch.float32
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)


def test_dispatch_uses_the_fused_loop_and_the_autograd_loop_alike(monkeypatch):
    """The MoE layer gives the same outputs and gradients with either loop (float64)."""
    from condcomp.layers.moe import MoE
    from condcomp.routing import TopKRouter

    torch.manual_seed(0)
    moe = MoE(d_model=8, d_ff=6, num_experts=5, router=TopKRouter(d_model=8, num_experts=5, k=2, capacity_factor=0.8),
              activation="swiglu").double()
    x = torch.randn(3, 11, 8, dtype=torch.float64)
    results = []
    for fused in (True, False):
        monkeypatch.setattr(grouped, "FUSED_LOOP", fused)
        moe.zero_grad()
        xg = x.clone().requires_grad_()
        y = moe(xg)[0]
        y.square().sum().backward()
        results.append([y.detach(), xg.grad] + [p.grad.clone() for p in moe.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b)
