import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from condcomp.dispatch import WeightedScatter, dispatch, dispatch_reference, weighted_scatter_reference
from condcomp.layers import FeedForward
from condcomp.layers.moe import MoE
from condcomp.routing import ExpertChoiceRouter, RoutingError, TopKRouter

from moe_reference import reference_expert_choice_global, reference_top_k


def make_moe(router_kind="top_k", *, d=8, d_ff=12, e=4, k=1, cf=None, activation="gelu", mode="global",
             dtype=torch.float64, seed=0, priority="position_major"):
    torch.manual_seed(seed)
    if router_kind == "top_k":
        router = TopKRouter(d_model=d, num_experts=e, k=k, capacity_factor=cf, priority=priority)
    else:
        router = ExpertChoiceRouter(d_model=d, num_experts=e, capacity_factor=cf or 2.0, mode=mode)
    return MoE(d_model=d, d_ff=d_ff, num_experts=e, router=router, activation=activation).to(dtype)


def grads(module, x, fn):
    module.zero_grad()
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in module.named_parameters()}


def assert_same(a, b, tol=1e-10):
    ya, gxa, gpa = a
    yb, gxb, gpb = b
    torch.testing.assert_close(ya, yb, rtol=tol, atol=tol)
    torch.testing.assert_close(gxa, gxb, rtol=tol, atol=tol)
    for name in gpa:
        torch.testing.assert_close(gpa[name], gpb[name], rtol=tol, atol=tol, msg=name)


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 7), e=st.integers(1, 5), k=st.integers(1, 3),
       cf=st.sampled_from([None, 0.5, 1.0, 1.25, 2.0]), act=st.sampled_from(["gelu", "swiglu"]),
       priority=st.sampled_from(["position_major", "rank_major"]), seed=st.integers(0, 10_000))
def test_top_k_matches_naive_reference_outputs_and_gradients(b, t, e, k, cf, act, priority, seed):
    k = min(k, e)
    moe = make_moe(e=e, k=k, cf=cf, activation=act, seed=seed, priority=priority)
    x = torch.randn(b, t, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    fast = grads(moe, x, lambda x: moe(x)[0])
    ref = grads(moe, x, lambda x: reference_top_k(moe, x))
    assert_same(fast, ref)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 12), e=st.integers(1, 5), cf=st.sampled_from([0.5, 1.0, 2.0, 3.0]),
       seed=st.integers(0, 10_000))
def test_expert_choice_matches_naive_reference_outputs_and_gradients(n, e, cf, seed):
    moe = make_moe("expert_choice", e=e, cf=cf, seed=seed)
    x = torch.randn(n, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    assert_same(grads(moe, x, lambda x: moe(x)[0]), grads(moe, x, lambda x: reference_expert_choice_global(moe, x)))


@pytest.mark.parametrize("router_kind, mode", [("top_k", None), ("expert_choice", "global"),
                                               ("expert_choice", "per_position")])
def test_fast_dispatch_equals_reference_dispatch(router_kind, mode):
    moe = make_moe(router_kind, k=2, cf=1.0, mode=mode or "global")
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    flat = x.reshape(-1, 8)
    fast = grads(moe, flat, lambda f: dispatch(f, moe.router(x), moe.experts))
    ref = grads(moe, flat, lambda f: dispatch_reference(f, moe.router(x), moe.experts))
    assert_same(fast, ref)


def test_shared_expert_is_added_to_the_routed_sum_outputs_and_gradients():
    """With a shared expert the dispatch adds the routed sum into the shared expert's output in place;
    outputs and every gradient equal shared(x) + the naive per-assignment reference (float64)."""
    torch.manual_seed(0)
    moe = MoE(d_model=8, d_ff=12, num_experts=4, router=TopKRouter(d_model=8, num_experts=4, k=2, capacity_factor=1.0),
              shared_expert_d_ff=10).double()
    x = torch.randn(3, 5, 8, dtype=torch.float64)

    def reference(flat):  # the router sees the same input, so the input gradient has its share too
        return moe.shared(flat)[0] + dispatch_reference(flat, moe.router(flat.view(3, 5, 8)), moe.experts)

    fast = grads(moe, x.reshape(-1, 8), lambda f: moe(f.view(3, 5, 8))[0].reshape(-1, 8))
    assert_same(fast, grads(moe, x.reshape(-1, 8), reference))


def test_one_expert_top1_dropless_equals_dense_ffn():
    moe = make_moe(e=1, k=1, cf=None, activation="swiglu", dtype=torch.float32)
    dense = FeedForward(d_model=8, d_ff=12, activation="swiglu")
    with torch.no_grad():
        dense.up.weight.copy_(moe.experts.up[0].t())
        dense.down.weight.copy_(moe.experts.down[0].t())
    x = torch.randn(2, 6, 8)
    y_moe, _ = moe(x)
    y_dense, _ = dense(x)
    torch.testing.assert_close(y_moe, y_dense)
    y_moe.square().sum().backward()
    y_dense.square().sum().backward()
    torch.testing.assert_close(moe.experts.up.grad[0], dense.up.weight.grad.t())
    torch.testing.assert_close(moe.experts.down.grad[0], dense.down.weight.grad.t())


def routed_to_expert0(n_experts=2, d=4):
    """A router whose gate sends every token to expert 0 (x has positive first feature)."""
    r = TopKRouter(d_model=d, num_experts=n_experts, k=1, capacity_factor=1.0)
    with torch.no_grad():
        r.gate.weight.zero_()
        r.gate.weight[0, 0] = 5.0
    return r


def test_capacity_drops_exactly_the_overflow_latest_positions_first():
    r = routed_to_expert0()
    x = torch.zeros(2, 4, 4)
    x[..., 0] = 1.0  # all 8 tokens prefer expert 0; capacity = ceil(1.0 * 1 * 8 / 2) = 4
    routing = r(x)
    assert routing.group_sizes.tolist() == [4, 0]
    assert int(routing.dropped.sum()) == 4
    # Position-major priority: positions 0 and 1 of both sequences are kept, 2 and 3 dropped.
    assert routing.dropped.view(2, 4).tolist() == [[False, False, True, True]] * 2
    assert routing.metrics["fraction_dropped"].item() == 0.5


def _two_experts_each_token_ranks_first(priority):
    r = TopKRouter(d_model=4, num_experts=2, k=2, capacity_factor=0.5, priority=priority)  # capacity 2
    with torch.no_grad():
        r.gate.weight.copy_(torch.tensor([[4.0, 0, 0, 0], [0, 4.0, 0, 0]]))
    x = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0]])
    return r(x)


def test_rank_major_second_choices_yield_to_every_first_choice():
    routing = _two_experts_each_token_ranks_first("rank_major")
    # GShard: each expert's 2 slots go to the tokens that ranked it first; every second choice is dropped.
    assert routing.group_sizes.tolist() == [2, 2]
    assert sorted(routing.token_index[:2].tolist()) == [0, 2] and sorted(routing.token_index[2:].tolist()) == [1, 3]
    assert routing.metrics["fraction_assignments_dropped"].item() == 0.5 and not routing.dropped.any()


def test_position_major_serves_earlier_positions_both_choices_first():
    routing = _two_experts_each_token_ranks_first("position_major")
    # Tokens 0 and 1 take both of their experts before token 2 is considered: 2 and 3 get nothing.
    assert routing.group_sizes.tolist() == [2, 2]
    assert sorted(routing.token_index[:2].tolist()) == [0, 1] and sorted(routing.token_index[2:].tolist()) == [0, 1]
    assert routing.dropped.tolist() == [False, False, True, True]


def test_infinite_capacity_equals_dropless():
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    big = make_moe(k=2, cf=1e9)
    dropless = make_moe(k=2, cf=None)
    torch.testing.assert_close(big(x)[0], dropless(x)[0], rtol=0, atol=0)


@pytest.mark.parametrize("router_kind, mode", [("top_k", None), ("expert_choice", "global"),
                                               ("expert_choice", "per_position")])
def test_padded_tokens_are_never_routed_or_counted(router_kind, mode):
    moe = make_moe(router_kind, k=2, cf=1.0, mode=mode or "global")
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    real = torch.ones(2, 6, dtype=torch.bool)
    real[0, 4:] = False
    real[1, 5:] = False
    y, info = moe(x, real)
    routing = moe.router(x, real)
    assert real.reshape(-1)[routing.token_index].all()
    assert (y[~real] == 0).all()
    # Padded tokens carry garbage: changing it changes nothing, losses included.
    x2 = x.clone()
    x2[~real] = torch.randn(int((~real).sum()), 8, dtype=torch.float64) * 100
    y2, info2 = moe(x2, real)
    torch.testing.assert_close(y, y2)
    for name in info.aux_losses:
        torch.testing.assert_close(info.aux_losses[name], info2.aux_losses[name])
    if router_kind == "top_k":
        # Position-major capacity counts every token slot (12), so later padding cannot change it:
        # ceil(1.0 * 2 * 12 / 4) = 6.
        assert moe.router.capacity(12) == 6 and routing.group_sizes.max() <= 6


def test_top_k_losses_ignore_padding_exactly():
    moe = make_moe(k=1, cf=None)
    x = torch.randn(1, 6, 8, dtype=torch.float64)
    real = torch.tensor([[True, True, True, True, False, False]])
    _, padded = moe(x, real)
    _, trimmed = moe(x[:, :4])
    for name in padded.aux_losses:
        torch.testing.assert_close(padded.aux_losses[name], trimmed.aux_losses[name])


def test_load_balance_loss_is_one_for_a_uniform_router():
    r = TopKRouter(d_model=4, num_experts=4, k=1, capacity_factor=None)
    with torch.no_grad():
        r.gate.weight.zero_()
    assert r(torch.randn(16, 4)).aux_losses["load_balance"].item() == pytest.approx(1.0)


@pytest.mark.parametrize("k, cf", [(1, None), (2, None), (2, 1.25)])
def test_float64_gradcheck(k, cf):
    moe = make_moe(k=k, cf=cf, d=4, d_ff=5, e=3)
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: moe(x)[0], (x,))
    up = moe.experts.up
    assert torch.autograd.gradcheck(lambda w: _with_param(moe, "up", w, x), (up.detach().clone().requires_grad_(),))


def _with_param(moe, name, value, x):
    original = getattr(moe.experts, name)
    try:
        del moe.experts._parameters[name]
        setattr(moe.experts, name, value)
        return moe(x.detach())[0]
    finally:
        delattr(moe.experts, name)
        moe.experts.register_parameter(name, original)


def test_expert_choice_gradcheck_reaches_the_router():
    moe = make_moe("expert_choice", d=4, d_ff=5, e=3)
    gate = moe.router.gate.weight
    x = torch.randn(6, 4, dtype=torch.float64)

    def f(w):
        del moe.router.gate._parameters["weight"]
        moe.router.gate.weight = w
        try:
            return moe(x)[0]
        finally:
            del moe.router.gate.weight
            moe.router.gate.register_parameter("weight", gate)

    assert torch.autograd.gradcheck(f, (gate.detach().clone().requires_grad_(),))


def test_dropless_top_k_is_batch_invariant():
    moe = make_moe(k=2, cf=None)
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    together = moe(x)[0]
    alone = torch.cat([moe(x[i : i + 1])[0] for i in range(4)])
    torch.testing.assert_close(together, alone)


def test_expert_choice_inference_thresholds_are_batch_invariant():
    moe = make_moe("expert_choice", mode="per_position", dtype=torch.float32)
    x = torch.randn(8, 6, 8)
    moe.train()
    for _ in range(3):
        moe(x)  # learn thresholds
    assert moe.router.thresholds_seen and (moe.router.thresholds > 0).all()
    moe.eval()
    together = moe(x)[0]
    alone = torch.cat([moe(x[i : i + 1])[0] for i in range(8)])
    torch.testing.assert_close(together, alone)


@pytest.mark.parametrize("kwargs, message", [
    (dict(k=5), "k must be between 1 and num_experts=4"),
    (dict(k=0), "k must be between"),
    (dict(capacity_factor=0), "capacity_factor must be > 0, got 0; use None for dropless"),
    (dict(capacity_factor=-1.0), "capacity_factor must be > 0"),
    (dict(jitter=1.5), "jitter"),
])
def test_invalid_top_k_settings(kwargs, message):
    with pytest.raises(RoutingError, match=message):
        TopKRouter(d_model=8, num_experts=4, **kwargs)


def test_invalid_expert_choice_settings():
    with pytest.raises(RoutingError, match="capacity_factor must be > 0"):
        ExpertChoiceRouter(d_model=8, num_experts=4, capacity_factor=0)
    with pytest.raises(RoutingError, match="mode must be one of"):
        ExpertChoiceRouter(d_model=8, num_experts=4, mode="causal")
    with pytest.raises(RoutingError, match=r"needs input \[batch, seq, d\]"):
        ExpertChoiceRouter(d_model=8, num_experts=4, mode="per_position")(torch.randn(5, 8))


def test_dimension_mismatch_and_nan_input_are_clear_errors():
    moe = make_moe(dtype=torch.float32)
    with pytest.raises(RoutingError, match="does not match the router's d_model=8"):
        moe(torch.randn(2, 3, 7))
    with pytest.raises(RoutingError, match="NaN"):
        moe(torch.full((2, 3, 8), float("nan")))
    with pytest.raises(RoutingError, match="router was built for d_model=8"):
        MoE(d_model=16, d_ff=8, num_experts=4, router=TopKRouter(d_model=8, num_experts=4))
    with pytest.raises(RoutingError, match="padding_mask shape"):
        moe(torch.randn(2, 3, 8), torch.ones(2, 4, dtype=torch.bool))


def test_metrics_describe_the_routing():
    moe = make_moe(k=2, cf=None, e=4)
    _, info = moe(torch.randn(3, 5, 8, dtype=torch.float64))
    m = info.metrics
    assert m["tokens_per_expert"].sum() == 30
    assert m["experts_per_token_hist"].tolist() == [0, 0, 15, 0, 0]
    assert 0 < m["router_entropy"] <= math.log(4) + 1e-9
    assert m["fraction_dropped"] == 0


def test_weighted_scatter_matches_plain_ops_and_gradchecks():
    g = torch.Generator().manual_seed(0)
    ys = torch.randn(7, 3, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.rand(7, dtype=torch.float64, generator=g, requires_grad=True)
    index = torch.tensor([0, 2, 2, 4, 0, 1, 4])  # repeated rows: several experts per token
    fast = WeightedScatter.apply(ys, w, index, 5)
    ref = weighted_scatter_reference(ys, w, index, 5)
    torch.testing.assert_close(fast, ref)
    grad = torch.randn(5, 3, dtype=torch.float64, generator=g)
    torch.testing.assert_close(torch.autograd.grad(fast, (ys, w), grad), torch.autograd.grad(ref, (ys, w), grad))
    assert torch.autograd.gradcheck(lambda a, b: WeightedScatter.apply(a, b, index, 5), (ys, w))
    # Added into an existing tensor in place: that tensor plus the scatter, and its gradient passes through.
    base = torch.randn(5, 3, dtype=torch.float64, generator=g, requires_grad=True)
    into = WeightedScatter.apply(ys, w, index, 5, base * 1.0)
    torch.testing.assert_close(into, base + ref)
    assert torch.autograd.gradcheck(lambda a, b, c: WeightedScatter.apply(a, b, index, 5, c * 1.0), (ys, w, base))


@settings(max_examples=200, deadline=None)
@given(m=st.integers(0, 200_000))
def test_size_class_pads_little_and_is_a_fixed_point(m):
    from condcomp.dispatch import grouped

    c = grouped.size_class(m)
    assert m <= c < m + max(grouped.SIZE_CLASS_MIN, m / 2**grouped.SIZE_CLASS_BITS)
    assert grouped.size_class(c) == c


def test_size_classes_make_group_shapes_repeat():
    from condcomp.dispatch import grouped

    assert len({grouped.size_class(m) for m in range(1025, 2049)}) == 2**grouped.SIZE_CLASS_BITS


@pytest.mark.parametrize("cf", [1.25, None])
def test_size_class_padding_leaves_outputs_and_gradients_unchanged(cf, monkeypatch):
    """Varying group sizes (top-2 of 6 at capacity 1.25, and dropless): the padded loop equals the
    exact-size loop on outputs and on every gradient (padding rows carry weight 0)."""
    from condcomp.dispatch import grouped

    monkeypatch.setattr(grouped, "SIZE_CLASSES", "always")  # float64 on CPU does not pad by default
    moe = make_moe(e=6, k=2, cf=cf, activation="swiglu", seed=3)
    x = torch.randn(4, 50, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    sizes = moe.router(x).group_sizes.tolist()
    assert any(grouped.size_class(m) != m for m in sizes)          # padding happens here
    padded = grads(moe, x, lambda x: moe(x)[0])
    monkeypatch.setattr(grouped, "SIZE_CLASS_BITS", None)
    exact = grads(moe, x, lambda x: moe(x)[0])
    assert_same(padded, exact)


def test_gate_scale_multiplies_the_routed_output_and_keeps_the_router_gradient():
    from condcomp.config import ConfigError, ModelConfig
    from condcomp.techniques.moe import MoESettings

    moe = make_moe(e=8, k=1, cf=None, activation="swiglu", seed=5)
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    y1 = moe(x)[0]
    moe.router.gate_scale = 8.0
    y8 = moe(x)[0]
    torch.testing.assert_close(y8, 8.0 * y1)
    y8.square().sum().backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0      # the LM loss still trains the router
    with pytest.raises(RoutingError, match="gate_scale"):
        TopKRouter(d_model=8, num_experts=4, gate_scale=0.0)
    with pytest.raises(ConfigError, match="gate_scale"):
        ModelConfig(d_model=32, n_heads=2, ffn="moe", moe=MoESettings(router="expert_choice", gate_scale=8.0))


def test_size_classes_pad_on_cpu_only_in_reduced_precision():
    """By default the CPU loop pads in bf16 (oneDNN keeps state per GEMM shape) and not in fp32 (BLAS
    keeps none): the padding shows as overhead FLOPs under bf16 autocast only."""
    from condcomp.flops import flop_counter
    from condcomp.recompute import count_recomputed_flops

    moe = make_moe(e=6, k=2, cf=None, activation="swiglu", seed=3, dtype=torch.float32)
    x = torch.randn(4, 50, 8, requires_grad=True)

    def overhead(bf16: bool):
        with flop_counter(), count_recomputed_flops() as flops, torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            moe(x)[0].float().square().sum().backward()
        return sum(flops)

    assert overhead(bf16=False) == 0 and overhead(bf16=True) > 0


@pytest.mark.parametrize("fused_loop", [True, False])
def test_size_class_padding_is_executed_but_not_charged_as_model_flops(monkeypatch, fused_loop):
    """Under a trainer's counting, the padded loop's extra FLOPs are reported as overhead, so executed
    minus overhead equals the exact loop's FLOPs (the FLOPs budget charges real assignments only),
    with the one-node expert loop and with the per-expert autograd loop."""
    from condcomp.dispatch import grouped
    from condcomp.flops import flop_counter
    from condcomp.recompute import count_recomputed_flops

    monkeypatch.setattr(grouped, "FUSED_LOOP", fused_loop)
    monkeypatch.setattr(grouped, "SIZE_CLASSES", "always")  # fp32 on CPU does not pad by default
    moe = make_moe(e=6, k=2, cf=None, activation="swiglu", seed=3, dtype=torch.float32)
    x = torch.randn(4, 50, 8, requires_grad=True)                   # a hidden state in training

    def counted():
        with flop_counter() as counter, count_recomputed_flops() as overhead:
            moe(x)[0].square().sum().backward()
        return counter.get_total_flops(), sum(overhead)

    executed, overhead = counted()
    monkeypatch.setattr(grouped, "SIZE_CLASS_BITS", None)
    exact, none = counted()
    assert overhead > 0 and none == 0 and executed > exact
    assert executed - overhead == pytest.approx(exact, rel=1e-9)
