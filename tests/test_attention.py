"""layers.sdpa: the materialized attention kernel against PyTorch's SDPA (its reference twin)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from condcomp.layers.sdpa import MATERIALIZED_MAX_LEN, MaterializedAttention, attention, uses_materialized


def _qkv(b, h, kv, t, s, hd, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, hd, generator=g, dtype=torch.float64)
    k = torch.randn(b, kv, s, hd, generator=g, dtype=torch.float64)
    v = torch.randn(b, kv, s, hd, generator=g, dtype=torch.float64)
    return [x.to(dtype).requires_grad_() for x in (q, k, v)]


@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 2), kv=st.integers(1, 2), groups=st.integers(1, 3), t=st.integers(1, 9),
       s_extra=st.integers(-3, 3), causal=st.booleans(), scale=st.sampled_from([None, 0.3]))
def test_materialized_matches_sdpa_outputs_and_gradients_in_float64(b, kv, groups, t, s_extra, causal, scale):
    """Property: same output and q/k/v gradients as F.scaled_dot_product_attention, for causal and
    not, grouped-query heads, more or fewer keys than queries, and an explicit scale."""
    s = max(1, t + s_extra)
    if causal and s < t:
        s = t  # top-left causal with fewer keys than queries is allowed, but keep every row non-empty
    q, k, v = _qkv(b, kv * groups, kv, t, s, 4, torch.float64)
    grad = torch.randn(b, kv * groups, t, 4, dtype=torch.float64)
    ours = MaterializedAttention.apply(q, k, v, causal, scale)
    ours_grads = torch.autograd.grad(ours, (q, k, v), grad)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=groups > 1)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad)
    torch.testing.assert_close(ours, ref)
    for a, r in zip(ours_grads, ref_grads):
        torch.testing.assert_close(a, r)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("groups", [1, 2])
def test_materialized_gradcheck(causal, groups):
    q, k, v = _qkv(2, 2 * groups, 2, 5, 5, 3, torch.float64)
    assert torch.autograd.gradcheck(lambda q, k, v: MaterializedAttention.apply(q, k, v, causal, None), (q, k, v))


def test_materialized_is_causal():
    """No look-ahead: perturbing keys/values at positions > i leaves query i's output unchanged."""
    q, k, v = _qkv(1, 2, 2, 8, 8, 4, torch.float64)
    out = MaterializedAttention.apply(q, k, v, True, None)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[:, :, 5:] += 3.0
    v2[:, :, 5:] -= 2.0
    out2 = MaterializedAttention.apply(q, k2, v2, True, None)
    torch.testing.assert_close(out[:, :, :5], out2[:, :, :5])
    assert not torch.allclose(out[:, :, 5:], out2[:, :, 5:])


def _eager_bf16(q, k, v, is_causal, enable_gqa):
    """The textbook composition users write under autocast: bf16 scores, fp32 softmax, bf16 probabilities."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if is_causal:
        scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores.float(), -1).to(q.dtype) @ v


@pytest.mark.parametrize("causal", [True, False])
def test_bf16_dispatch_is_as_accurate_as_the_plain_bf16_composition(causal):
    """In bf16 on CPU ``attention`` takes the materialized path. Against a float64 reference, its output
    and gradients are as accurate as the textbook bf16 composition (within 1.5x), and its gradients
    within 2x of PyTorch's flash kernel, which computes in fp32 inside (its output is more exact:
    the scores are not rounded to bf16 there)."""
    q, k, v = _qkv(2, 4, 2, 64, 64, 32, torch.bfloat16)
    assert uses_materialized(q, k)
    grad = torch.randn(2, 4, 64, 32, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    exact_in = [x.detach().double().requires_grad_() for x in (q, k, v)]
    exact = F.scaled_dot_product_attention(*exact_in, is_causal=causal, enable_gqa=True)
    exact = [exact, *torch.autograd.grad(exact, exact_in, grad.double())]
    errors = {}
    for name, fn in {"ours": attention, "flash": F.scaled_dot_product_attention, "eager": _eager_bf16}.items():
        out = fn(q, k, v, is_causal=causal, enable_gqa=True)
        results = [out, *torch.autograd.grad(out, (q, k, v), grad)]
        errors[name] = [(r.double() - e).abs().max().item() for r, e in zip(results, exact)]
    for i in range(4):
        assert errors["ours"][i] <= 1.5 * errors["eager"][i], (i, errors)
    for i in range(1, 4):
        assert errors["ours"][i] <= 2 * errors["flash"][i], (i, errors)


def test_dispatch_falls_back_to_pytorch_where_it_is_not_faster_or_not_supported():
    q, k, _ = _qkv(1, 2, 2, 8, 8, 4, torch.bfloat16)
    assert uses_materialized(q, k)
    assert not uses_materialized(q.half(), k.half())  # no measurement says it pays in fp16
    assert not uses_materialized(q, k, attn_mask=torch.ones(8, 8, dtype=torch.bool))
    assert not uses_materialized(q, k, dropout_p=0.1)
    for dtype, limits in MATERIALIZED_MAX_LEN.items():
        for phase, max_len in limits.items():
            at, over = (_qkv(1, 1, 1, n, n, 4, dtype)[:2] for n in (max_len, max_len + 1))
            assert uses_materialized(*at, backward=phase == "train")
            assert not uses_materialized(*over, backward=phase == "train")
    # An explicit mask still works (through PyTorch's kernel) and gives PyTorch's result.
    q, k, v = _qkv(1, 2, 2, 6, 6, 4, torch.bfloat16)
    mask = torch.rand(6, 6, generator=torch.Generator().manual_seed(0)) > 0.3
    mask |= torch.eye(6, dtype=torch.bool)
    torch.testing.assert_close(attention(q, k, v, attn_mask=mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
