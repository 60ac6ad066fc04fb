"""Soft top-k: constraints, agreement of both solvers, implicit backward == unrolled autograd."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from condcomp.routing.soft_top_k import soft_top_k, soft_top_k_unrolled


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 4), n=st.integers(2, 64), frac=st.floats(0.05, 0.95), eps=st.sampled_from([0.05, 0.3, 1.0]),
       scale=st.sampled_from([0.1, 1.0, 10.0]), seed=st.integers(0, 2**16))
def test_weights_in_unit_interval_and_sum_to_k(rows, n, frac, eps, scale, seed):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(rows, n, generator=g, dtype=torch.float64) * scale
    k = max(1.0, round(frac * n))
    w = soft_top_k(s, k, eps=eps)
    assert (w >= 0).all() and (w <= 1).all()
    torch.testing.assert_close(w.sum(-1), torch.full((rows,), float(min(k, n)), dtype=torch.float64), atol=1e-9, rtol=0)
    # The weights keep the scores' order, so the hard top-k of w is the top-k of s.
    by_score = w.gather(-1, s.argsort(dim=-1, descending=True))
    assert (by_score[..., 1:] <= by_score[..., :-1] + 1e-12).all()


@settings(max_examples=25, deadline=None)
@given(n=st.integers(3, 40), k=st.integers(1, 8), eps=st.sampled_from([0.1, 0.5]), seed=st.integers(0, 2**16))
def test_implicit_backward_matches_unrolled_autograd(n, k, eps, seed):
    k = min(k, n - 1)
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, n, generator=g, dtype=torch.float64)
    up = torch.randn(2, n, generator=g, dtype=torch.float64)
    s1 = s.clone().requires_grad_()
    w1 = soft_top_k(s1, k, eps=eps)
    (w1 * up).sum().backward()
    s2 = s.clone().requires_grad_()
    w2 = soft_top_k_unrolled(s2, k, eps=eps, iters=3000)  # run to convergence at a fixed eps
    (w2 * up).sum().backward()
    torch.testing.assert_close(w1, w2, atol=1e-7, rtol=0)
    torch.testing.assert_close(s1.grad, s2.grad, atol=1e-6, rtol=1e-5)


def test_coordinate_descent_agrees_with_exact_solve():
    s = torch.randn(4, 100, dtype=torch.float64)
    exact = soft_top_k(s, 10, eps=0.5)
    cd = soft_top_k(s, 10, eps=0.5, method="coordinate_descent", iters=200)
    torch.testing.assert_close(exact, cd, atol=1e-8, rtol=0)


def test_gradcheck_float64():
    s = torch.randn(2, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: soft_top_k(x, 3, eps=0.3), (s,), eps=1e-6, atol=1e-5)


def test_masked_entries_get_zero_weight_and_zero_gradient():
    s = torch.randn(3, 20, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 20) > 0.4
    mask[:, 0] = True
    w = soft_top_k(s, 4, mask=mask)
    assert (w[~mask] == 0).all()
    real = mask.sum(-1).to(torch.float64)
    torch.testing.assert_close(w.sum(-1), torch.minimum(real, torch.full_like(real, 4.0)), atol=1e-9, rtol=0)
    w.pow(2).sum().backward()
    assert (s.grad[~mask] == 0).all()


def test_k_at_least_the_real_count_selects_everything_with_weight_one():
    s = torch.randn(2, 9, requires_grad=True)
    w = soft_top_k(s, 9)
    assert torch.equal(w, torch.ones_like(w))
    w.sum().backward()
    assert (s.grad == 0).all()


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="k must be > 0"):
        soft_top_k(torch.randn(5), 0)
    with pytest.raises(ValueError, match="method"):
        soft_top_k(torch.randn(5), 2, method="bisection")
    with pytest.raises(ValueError, match="eps > 0"):
        soft_top_k(torch.randn(5), 2, eps=0)
