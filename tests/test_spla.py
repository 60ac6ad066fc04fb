"""SPLA, block-sparse and linear attention (condcomp.layers.SparseLinearAttention): each fast path
against a brute-force reference built from dense [T, T] weight matrices, dense equivalence when every
block is read, decode == forward, no look-ahead, padding ignored, batch invariance, float64 gradcheck,
the block choice against a loop-by-loop reference, and bad input."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from condcomp.config import ConfigError, ModelConfig, from_dict
from condcomp.layers import Attention, ModelCache, SparseLinearAttention
from condcomp.layers.sparse_linear_attention import (causal_linear_attention, feature_map, linear_residual,
                                                      sparse_linear_attention)
from condcomp.models import Transformer
from condcomp.routing import RoutingError
from condcomp.routing.block_select import block_summaries, log_block_mass, select_past_blocks

MODES = {"spla": {}, "block_sparse": dict(selection="first_order", residual="none"), "linear": dict(mode="linear")}


def _qkv(b=2, h=4, g=2, t=29, hd=8, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, t, hd, generator=gen, dtype=dtype)
    k = torch.randn(b, g, t, hd, generator=gen, dtype=dtype)
    v = torch.randn(b, g, t, hd, generator=gen, dtype=dtype)
    return q, k, v


def _select(q, k, real, block, top_k, order=2):
    """The layer's own choice for (q, k), shaped as sparse_linear_attention takes it."""
    b, h, t, hd = q.shape
    g = k.shape[1]
    nb = -(-t // block)
    pad = nb * block - t
    real = torch.ones(b, t, dtype=torch.bool) if real is None else real
    qp, kp, realp = F.pad(q, (0, 0, 0, pad)), F.pad(k, (0, 0, 0, pad)), F.pad(real, (0, pad), value=False)
    r = h // g
    rows = qp.view(b, g, r, nb, block, hd).permute(0, 1, 3, 2, 4, 5).reshape(b, g, nb, r * block, hd)
    key_real = realp.view(b, 1, nb, block)
    row_real = key_real[:, :, :, None, :].expand(b, 1, nb, r, block).reshape(b, 1, nb, r * block)
    return select_past_blocks(rows, row_real, kp.view(b, g, nb, block, hd) * hd ** -0.5, key_real, top_k, order)


def reference_spla(q, k, v, real, block, index, valid, log_alpha):
    """Brute force: one [T, T] weight matrix per (sequence, head). Key s is read exactly by query t if
    it is in t's block at or before t, or in one of the blocks t's block chose; any other real key in
    an earlier block gets alpha phi(q).phi(k) (when log_alpha is given); y = W v / W.sum."""
    b, h, t, hd = q.shape
    g = k.shape[1]
    real = torch.ones(b, t, dtype=torch.bool) if real is None else real
    y = torch.zeros_like(q)
    for bi in range(b):
        for hi in range(h):
            gi = hi // (h // g)
            logits = q[bi, hi] @ k[bi, gi].T / math.sqrt(hd)
            kernel = feature_map(q[bi, hi]) @ feature_map(k[bi, gi]).T
            rows = []
            for ti in range(t):
                qb = ti // block
                chosen = {int(j) for j, ok in zip(index[bi, gi, qb], valid[bi, gi, qb]) if ok}
                w = []
                for s in range(t):
                    sb = s // block
                    if not real[bi, s] and real[bi, ti]:
                        w.append(torch.zeros((), dtype=q.dtype))
                    elif (sb == qb and s <= ti) or sb in chosen:
                        w.append(torch.exp(logits[ti, s]))
                    elif sb < qb and log_alpha is not None and real[bi, ti]:
                        w.append(torch.exp(log_alpha[hi]) * kernel[ti, s])
                    else:
                        w.append(torch.zeros((), dtype=q.dtype))
                rows.append(torch.stack(w))
            weights = torch.stack(rows)
            y[bi, hi] = weights @ v[bi, gi] / weights.sum(-1, keepdim=True)
    return y


# ----------------------------------------------------------------------------------------------
# The fast path against references


@pytest.mark.parametrize("t,block,top_k", [(29, 4, 2), (16, 4, 1), (13, 5, 0), (20, 4, 9)])
@pytest.mark.parametrize("residual", [True, False])
def test_spla_equals_the_brute_force_reference_outputs_and_gradients(t, block, top_k, residual):
    q, k, v = _qkv(t=t)
    log_alpha = torch.tensor([-1.0, -2.0, -0.5, -3.0], dtype=torch.float64) if residual else None
    real = torch.ones(2, t, dtype=torch.bool)
    real[1, :3] = False  # left padding in one sequence
    real[0, t - 2 :] = False  # right padding in the other
    selection = _select(q, k, real, block, top_k)
    leaves = [z.clone().requires_grad_() for z in (q, k, v)] + ([log_alpha.clone().requires_grad_()] if residual else [])
    fast = sparse_linear_attention(*leaves[:3], real, block=block, top_k=top_k, log_alpha=leaves[3] if residual else None,
                                   selection=selection)
    rleaves = [z.clone().detach().requires_grad_() for z in leaves]
    ref = reference_spla(*rleaves[:3], real, block, *selection, rleaves[3] if residual else None)
    keep = real[:, None, :, None]  # padded query rows are discarded
    torch.testing.assert_close(fast * keep, ref * keep, rtol=1e-10, atol=1e-10)
    grad = torch.randn_like(fast) * keep
    (fast * grad).sum().backward()
    (ref * grad).sum().backward()
    for a, r in zip(leaves, rleaves):
        want = torch.zeros_like(a) if r.grad is None else r.grad  # nothing left for the residual: no path to alpha
        torch.testing.assert_close(a.grad, want, rtol=1e-9, atol=1e-10)


def test_recompute_in_chunks_gives_the_same_outputs_and_gradients(monkeypatch):
    import condcomp.layers.sparse_linear_attention as spla_module

    monkeypatch.setattr(spla_module, "CHUNK_ELEMENTS", 200)  # several chunks of query blocks
    q, k, v = _qkv(t=37)
    log_alpha = torch.tensor([-1.0, -2.0, -0.5, -3.0], dtype=torch.float64)
    grads = []
    for recompute in (False, True):
        leaves = [z.clone().requires_grad_() for z in (q, k, v, log_alpha)]
        y = sparse_linear_attention(*leaves[:3], None, block=4, top_k=2, log_alpha=leaves[3], recompute=recompute)
        y.sum().backward()
        grads.append([y.detach()] + [z.grad for z in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_residual_is_linear_attention_over_exactly_the_unselected_blocks():
    b, g, r, nb, block, hd = 1, 2, 2, 6, 3, 4
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(b, g * r, nb * block, hd, generator=gen, dtype=torch.float64)
    kb = torch.randn(b, g, nb, block, hd, generator=gen, dtype=torch.float64)
    vb = torch.randn(b, g, nb, block, hd, generator=gen, dtype=torch.float64)
    key_real = torch.ones(b, 1, nb, block, dtype=torch.bool)
    key_real[0, 0, 1, 2] = False
    index = torch.tensor([[[0, 0], [0, 0], [1, 0], [0, 2], [3, 1], [4, 0]]] * g).unsqueeze(0)
    valid = torch.tensor([[[False, False], [True, False], [True, False], [True, True], [True, True], [True, True]]] * g)[None]
    num, den = linear_residual(q, kb, vb, key_real, index, valid)  # [b, g, nb, r, B, hd | 1]
    for g_ in range(g):
        for i in range(nb):
            chosen = {int(j) for j, ok in zip(index[0, g_, i], valid[0, g_, i]) if ok}
            keys = [(j, p) for j in range(i) if j not in chosen for p in range(block) if key_real[0, 0, j, p]]
            for head in range(r):
                phi_q = feature_map(q[0, g_ * r + head, i * block : (i + 1) * block])  # [B, hd]
                want_num = torch.zeros(block, hd, dtype=torch.float64)
                want_den = torch.zeros(block, dtype=torch.float64)
                for j, p in keys:
                    w = phi_q @ feature_map(kb[0, g_, j, p])
                    want_num += w[:, None] * vb[0, g_, j, p]
                    want_den += w
                torch.testing.assert_close(num[0, g_, i, head], want_num, rtol=1e-10, atol=1e-12)
                torch.testing.assert_close(den[0, g_, i, head, :, 0], want_den, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("t,block", [(23, 4), (8, 8), (5, 16)])
def test_causal_linear_attention_equals_brute_force(t, block):
    q, k, v = _qkv(t=t)
    real = torch.ones(2, t, dtype=torch.bool)
    real[0, :2] = False
    y = causal_linear_attention(q, k, v, real, block=block)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    w = (feature_map(q) @ feature_map(kk).transpose(-1, -2)).tril() * real[:, None, None, :]
    want = (w @ vv) / w.sum(-1, keepdim=True)
    keep = real[:, None, :, None]
    torch.testing.assert_close(y * keep, torch.nan_to_num(want) * keep, rtol=1e-10, atol=1e-12)


@given(t=st.integers(1, 40), block=st.integers(1, 9), g=st.sampled_from([1, 2, 4]), seed=st.integers(0, 99))
@settings(max_examples=25, deadline=None)
def test_every_block_read_is_dense_causal_attention(t, block, g, seed):
    """With top_k at least the number of past blocks, nothing is left for the residual: the output is
    dense causal attention (grouped-query heads, any length, any block size)."""
    q, k, v = _qkv(t=t, g=g, seed=seed)
    log_alpha = torch.zeros(4, dtype=torch.float64)
    y = sparse_linear_attention(q, k, v, None, block=block, top_k=-(-t // block), log_alpha=log_alpha)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-12)


def test_layer_with_every_block_read_equals_attention_on_the_same_weights():
    torch.manual_seed(0)
    dense = Attention(d_model=32, n_heads=4, n_kv_heads=2, max_len=64).double()
    sparse = SparseLinearAttention(d_model=32, n_heads=4, n_kv_heads=2, max_len=64, block=8, top_k=8).double()
    missing, unexpected = sparse.load_state_dict(dense.state_dict(), strict=False)
    assert missing == ["log_alpha"] and not unexpected
    x = torch.randn(2, 50, 32, dtype=torch.float64)
    mask = torch.ones(2, 50, dtype=torch.bool)
    mask[1, 40:] = False
    for padding in (None, mask):
        keep = 1 if padding is None else padding[..., None]
        torch.testing.assert_close(sparse(x, padding)[0] * keep, dense(x, padding)[0] * keep, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# The block choice


def test_block_choice_equals_a_loop_reference():
    """Block i is chosen for by block i - 1's queries (all heads of the group) through the two-sided
    second-order estimate n_j exp(mu_q.mu_k)(1 + (mu_q^2.var_k + var_q.mu_k^2 + var_q.var_k) / 2)."""
    b, h, g, t, hd, block, top_k = 2, 4, 2, 40, 8, 5, 3
    q, k, _ = _qkv(b=b, h=h, g=g, t=t, hd=hd, seed=3)
    for order in (1, 2):
        index, valid = _select(q, k, None, block, top_k, order)
        ks = k * hd ** -0.5
        for bi in range(b):
            for gi in range(g):
                for i in range(t // block):
                    if i == 0:
                        assert not valid[bi, gi, i].any()
                        continue
                    scorer = q[bi, gi * 2 : gi * 2 + 2, (i - 1) * block : i * block].reshape(-1, hd)
                    mu_q, var_q = scorer.mean(0), scorer.var(0, unbiased=False)
                    est = []
                    for j in range(i):
                        blk = ks[bi, gi, j * block : (j + 1) * block]
                        mu_k, var_k = blk.mean(0), blk.var(0, unbiased=False)
                        second = 0.5 * ((mu_q**2) @ var_k + var_q @ (mu_k**2) + var_q @ var_k)
                        est.append(block * torch.exp(mu_q @ mu_k) * ((1 + second) if order == 2 else 1))
                    want = set(torch.topk(torch.stack(est), min(top_k, i)).indices.tolist())
                    got = {int(j) for j, ok in zip(index[bi, gi, i], valid[bi, gi, i]) if ok}
                    assert got == want, (order, bi, gi, i)


def test_second_order_score_prefers_the_spread_out_block_that_holds_more_mass():
    """Two blocks with the same mean key: the one whose keys spread along the query's direction holds
    more softmax mass (Jensen), and only the second-order score sees it."""
    hd = 4
    query = torch.tensor([[2.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    tight = torch.zeros(4, hd, dtype=torch.float64)
    spread = torch.zeros(4, hd, dtype=torch.float64)
    spread[:, 0] = torch.tensor([-1.5, -0.5, 0.5, 1.5])
    keys = torch.stack([tight, spread])[None]  # [1, 2 blocks, 4, hd]
    mean, var, count = block_summaries(keys, torch.ones(1, 2, 4, dtype=torch.bool))
    true_mass = torch.exp(keys[0] @ query[0]).sum(-1)
    assert true_mass[1] > true_mass[0]
    no_spread = torch.zeros_like(query)
    second = log_block_mass(query, no_spread, mean[0], var[0], count[0], order=2)
    first = log_block_mass(query, no_spread, mean[0], var[0], count[0], order=1)
    assert second[0, 1] > second[0, 0]
    assert first[0, 1] == first[0, 0]
    # Its estimate of the spread block's mass is closer to the truth than the mean-key one.
    assert abs(second[0, 1].exp() - true_mass[1]) < abs(first[0, 1].exp() - true_mass[1])


# ----------------------------------------------------------------------------------------------
# Layer and model properties


def _layer(mode, **kw):
    torch.manual_seed(0)
    args = dict(d_model=32, n_heads=4, n_kv_heads=2, max_len=80, block=4, top_k=2)
    args.update(MODES[mode])
    args.update(kw)
    return SparseLinearAttention(**args).double()


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("prefix", [1, 4, 7, 12])
def test_decoding_token_by_token_equals_the_full_forward(mode, prefix):
    layer = _layer(mode)
    x = torch.randn(2, 30, 32, dtype=torch.float64)
    full, _ = layer(x)
    cache = layer.new_cache()
    outs = [layer(x[:, :prefix], cache=cache)[0]]
    outs += [layer(x[:, i : i + 1], cache=cache)[0] for i in range(prefix, 27)]
    outs.append(layer(x[:, 27:], cache=cache)[0])  # several tokens on a warm cache
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("attention", list(MODES))
def test_model_decodes_incrementally_like_its_full_forward(attention):
    torch.manual_seed(0)
    cfg = from_dict(ModelConfig, dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, seq_len=40,
                                      attention=attention, spla={"block": 4, "top_k": 2}))
    model = Transformer(cfg).double().eval()
    tokens = torch.randint(0, 256, (2, 30))
    full = model(tokens).logits
    cache = ModelCache()
    steps = [model(tokens[:, :9], cache=cache).logits] + [model(tokens[:, i : i + 1], cache=cache).logits
                                                           for i in range(9, 30)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("mode", list(MODES))
@given(cut=st.integers(1, 29), block=st.sampled_from([1, 3, 4, 8]), top_k=st.integers(0, 4), seed=st.integers(0, 50))
@settings(max_examples=15, deadline=None)
def test_no_look_ahead(mode, cut, block, top_k, seed):
    """Changing tokens from ``cut`` on changes no output before ``cut``: not through the exact part,
    the residual, or the choice of blocks (scored by the previous block's queries)."""
    layer = _layer(mode, block=block, top_k=top_k)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 30, 32, generator=gen, dtype=torch.float64)
    y = x.clone()
    y[:, cut:] = torch.randn(2, 30 - cut, 32, generator=gen, dtype=torch.float64) * 3
    a, _ = layer(x)
    b, _ = layer(y)
    torch.testing.assert_close(a[:, :cut], b[:, :cut], rtol=1e-10, atol=1e-12)
    assert not torch.allclose(a[:, cut:], b[:, cut:])


@pytest.mark.parametrize("mode", list(MODES))
def test_padding_is_ignored_and_batches_are_independent(mode):
    layer = _layer(mode)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(3, 26, 32, generator=gen, dtype=torch.float64)
    mask = torch.ones(3, 26, dtype=torch.bool)
    mask[0, :5] = False
    mask[1, 20:] = False
    mask[2, 7:9] = False
    y, _ = layer(x, mask)
    noisy = x.clone()
    noisy[~mask] = torch.randn(int((~mask).sum()), 32, generator=gen, dtype=torch.float64) * 10
    y2, _ = layer(noisy, mask)
    keep = mask[..., None]
    torch.testing.assert_close(y * keep, y2 * keep, rtol=1e-10, atol=1e-12)
    for i in range(3):  # each sequence alone gives what it gave in the batch
        alone, _ = layer(x[i : i + 1], mask[i : i + 1])
        torch.testing.assert_close(alone * keep[i], y[i : i + 1] * keep[i], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", list(MODES))
def test_float64_gradcheck(mode):
    layer = _layer(mode, d_model=8, n_heads=2, n_kv_heads=1, block=3, top_k=1)
    x = torch.randn(1, 10, 8, dtype=torch.float64, requires_grad=True)
    # The block choice is discrete and fixed under the small perturbations gradcheck makes.
    assert torch.autograd.gradcheck(lambda z: layer(z)[0], (x,), eps=1e-6, atol=1e-5)
    if layer.log_alpha is not None:
        layer(x)[0].sum().backward()
        assert layer.log_alpha.grad is not None and layer.log_alpha.grad.abs().sum() > 0


def test_bf16_autocast_runs_and_stays_close_to_fp32():
    layer = _layer("spla").float()
    x = torch.randn(2, 64, 32)
    want, _ = layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = layer(x)
    assert torch.isfinite(got).all()
    assert (got.float() - want).abs().max() < 0.1


# ----------------------------------------------------------------------------------------------
# Bad input and configs


def test_bad_arguments_fail_at_construction_with_clear_errors():
    with pytest.raises(ValueError, match="block must be >= 1"):
        SparseLinearAttention(d_model=32, n_heads=4, max_len=16, block=0)
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        SparseLinearAttention(d_model=32, n_heads=4, max_len=16, top_k=-1)
    with pytest.raises(ValueError, match="selection must be one of"):
        SparseLinearAttention(d_model=32, n_heads=4, max_len=16, selection="third")
    with pytest.raises(ValueError, match="divisible by n_heads"):
        SparseLinearAttention(d_model=30, n_heads=4, max_len=16)
    with pytest.raises(ConfigError, match="block: mod"):
        from_dict(ModelConfig, dict(d_model=32, n_heads=4, attention="spla", block="mod"))
    with pytest.raises(ConfigError, match="dropout"):
        from_dict(ModelConfig, dict(d_model=32, n_heads=4, attention="spla", dropout=0.1))
    with pytest.raises(ConfigError, match="selection"):
        from_dict(ModelConfig, dict(d_model=32, n_heads=4, attention="spla", spla={"selection": "third"}))


def test_nan_input_is_refused_and_padded_decoding_is_refused():
    layer = _layer("spla")
    x = torch.randn(1, 12, 32, dtype=torch.float64)
    x[0, 3, 0] = float("nan")
    with pytest.raises(RoutingError, match="NaN"):
        layer(x)
    with pytest.raises(ValueError, match="unpadded batch"):
        layer(torch.randn(1, 4, 32, dtype=torch.float64), torch.ones(1, 4, dtype=torch.bool), cache=layer.new_cache())


def test_top_k_beyond_the_past_blocks_and_lengths_off_the_block_grid_work():
    layer = _layer("spla", block=7, top_k=50)
    x = torch.randn(1, 19, 32, dtype=torch.float64)  # 19 = 2 * 7 + 5: padded to 21
    y, _ = layer(x)
    dense = Attention(d_model=32, n_heads=4, n_kv_heads=2, max_len=80).double()
    dense.load_state_dict(layer.state_dict(), strict=False)
    torch.testing.assert_close(y, dense(x)[0], rtol=1e-10, atol=1e-12)


def test_a_dense_models_weights_load_into_an_spla_model_and_match_it_when_every_block_is_read():
    from condcomp.convert.hf import load_dense_state

    torch.manual_seed(0)
    shape = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, seq_len=48)
    dense = Transformer(from_dict(ModelConfig, shape)).double().eval()
    sparse = Transformer(from_dict(ModelConfig, {**shape, "attention": "spla", "spla": {"block": 8, "top_k": 6}}))
    sparse = sparse.double().eval()
    load_dense_state(sparse, dense.state_dict(), what="the dense test model")
    tokens = torch.randint(0, 256, (2, 48))
    torch.testing.assert_close(sparse(tokens).logits, dense(tokens).logits, rtol=1e-9, atol=1e-9)
    narrow = Transformer(from_dict(ModelConfig, {**shape, "attention": "spla", "spla": {"block": 8, "top_k": 1}}))
    load_dense_state(narrow.double().eval(), dense.state_dict(), what="the dense test model")
    assert not torch.allclose(narrow(tokens).logits, dense(tokens).logits)  # now it reads less: an approximation


def _calibration_reference(q, k, real, block, index, valid):
    """Loop over every (sequence, head, query row): the mean over rows with unread keys of
    log sum_U exp(s) - log sum_U phi(q).phi(k)."""
    b, h, t, hd = q.shape
    g = k.shape[1]
    out = []
    for hi in range(h):
        gi = hi // (h // g)
        diffs = []
        for bi in range(b):
            for qi in range(t):
                if not real[bi, qi]:
                    continue
                qb = qi // block
                chosen = {int(j) for j, ok in zip(index[bi, gi, qb], valid[bi, gi, qb]) if ok}
                unread = [s for s in range(t) if s // block < qb and s // block not in chosen and real[bi, s]]
                if not unread:
                    continue
                logits = torch.stack([q[bi, hi, qi] @ k[bi, gi, s] for s in unread]) / math.sqrt(hd)
                kernel = sum(feature_map(q[bi, hi, qi]) @ feature_map(k[bi, gi, s]) for s in unread)
                diffs.append(logits.logsumexp(0) - torch.log(kernel))
        out.append(torch.stack(diffs).mean() if diffs else torch.tensor(float("nan"), dtype=q.dtype))
    return torch.stack(out)


@pytest.mark.parametrize("t, block, top_k", [(29, 4, 2), (32, 8, 1), (12, 4, 5)])
def test_calibrated_alpha_equals_a_row_by_row_reference_and_matches_the_residual_mass(t, block, top_k):
    from condcomp.layers.sparse_linear_attention import mass_matched_log_alpha

    q, k, v = _qkv(t=t)
    real = torch.ones(2, t, dtype=torch.bool)
    real[1, :3] = False  # left padding in the second sequence
    log_alpha, rows = mass_matched_log_alpha(q, k, real, block=block, top_k=top_k)
    index, valid = _select(q, k, real, block, top_k)
    expected = _calibration_reference(q, k, real, block, index, valid)
    torch.testing.assert_close(log_alpha, expected, equal_nan=True)
    assert bool((rows > 0).all()) == bool(torch.isfinite(expected).all())
    if t == 12:  # 3 blocks, top 5: every past block is read, nothing to calibrate on
        assert int(rows.sum()) == 0 and bool(log_alpha.isnan().all())
        return
    # The fast path's residual over the same unread blocks, scaled by the fitted alpha, carries the
    # softmax's mass on them in the geometric mean over rows.
    nb = -(-t // block)
    pad = nb * block - t
    qp, kp, vp = (F.pad(z, (0, 0, 0, pad)) for z in (q, k, v))
    realp = F.pad(real, (0, pad), value=False)
    _, den = linear_residual(qp, kp.view(2, 2, nb, block, 8), vp.view(2, 2, nb, block, 8),
                             realp.view(2, 1, nb, block), index, valid)  # [b, g, nb, r, B, 1]
    den = den[..., 0].permute(0, 1, 3, 2, 4).reshape(2, 4, nb * block)[:, :, :t]  # [b, h, t]
    for hi in range(4):
        gi = hi // 2
        logits = q[:, hi] @ k[:, gi].transpose(-1, -2) / math.sqrt(8)  # [b, t, t]
        blocks = torch.arange(t) // block
        unread = torch.zeros(2, t, t, dtype=torch.bool)
        for bi in range(2):
            for qi in range(t):
                chosen = index[bi, gi, blocks[qi]][valid[bi, gi, blocks[qi]]]
                unread[bi, qi] = (blocks < blocks[qi]) & ~torch.isin(blocks, chosen) & real[bi] & real[bi, qi]
        has = unread.any(-1)
        exact = logits.masked_fill(~unread, float("-inf")).logsumexp(-1)
        gap = (log_alpha[hi] + torch.log(den[:, hi]) - exact)[has]
        assert abs(float(gap.mean())) < 1e-9


def test_calibrating_a_pretrained_swap_fits_each_layer_on_its_own_input_then_shifts_all_end_to_end(monkeypatch):
    from condcomp.convert.hf import load_dense_state
    from condcomp.layers.sparse_linear_attention import fit_log_alpha
    from condcomp.layers.traits import calibrate_added_parameters

    torch.manual_seed(0)
    shape = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, seq_len=48)
    dense = Transformer(from_dict(ModelConfig, shape)).double().eval()

    def swapped():
        model = Transformer(from_dict(ModelConfig, {**shape, "attention": "spla", "spla": {"block": 8, "top_k": 1}}))
        load_dense_state(model.double().eval(), dense.state_dict(), what="the dense test model")
        return model

    tokens = torch.randint(0, 256, (2, 48))
    # Stage 1 alone (no shifts offered): each layer fitted on what it received, layer 0 already calibrated.
    monkeypatch.setattr(SparseLinearAttention, "calibration_shifts", (0.0,))
    sparse = swapped()
    default = sparse.blocks[0].attn.log_alpha.detach().clone()
    seen = []
    hook = sparse.blocks[1].attn.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    local = calibrate_added_parameters(sparse, tokens)
    hook.remove()
    assert sorted(local) == ["blocks.0.attn", "blocks.1.attn"]
    assert not torch.allclose(local["blocks.0.attn"], default)
    attn = sparse.blocks[1].attn
    q, k, v = attn._project(seen[0])
    expected, _ = fit_log_alpha(attn.rotary.apply(q), attn.rotary.apply(k), v, None, block=8, top_k=1)
    torch.testing.assert_close(attn.log_alpha.detach(), expected)
    assert sparse.training is False and all(p.grad is None for p in sparse.parameters())

    # Stage 2: one common shift, the one with the least next-token loss on the calibration tokens.
    shifts = (0.0, -2.0, -8.0, 3.0)
    monkeypatch.setattr(SparseLinearAttention, "calibration_shifts", shifts)
    shifted = calibrate_added_parameters(swapped(), tokens)
    delta = shifted["blocks.0.attn"] - local["blocks.0.attn"]
    assert float(delta[0]) in shifts
    for name in local:
        torch.testing.assert_close(shifted[name], local[name] + delta)

    def loss_at(d):
        model = swapped()
        for i, blk in enumerate(model.blocks):
            blk.attn.log_alpha.data.copy_(local[f"blocks.{i}.attn"] + d)
        with torch.no_grad():
            logits = model(tokens).logits[:, :-1]
        return float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)))

    assert all(loss_at(float(delta[0])) <= loss_at(d) + 1e-12 for d in shifts)


def test_fitted_alpha_is_the_best_candidate_for_the_layers_own_output():
    """The fit's closed form per candidate agrees with the fast path: run the real layer at the
    fitted alpha, at its grid neighbours and without the residual; the fitted one is closest to dense."""
    from condcomp.layers.sparse_linear_attention import ALPHA_OFFSETS, NO_RESIDUAL, fit_log_alpha

    gen = torch.Generator().manual_seed(3)
    b, h, g, t, hd, block, top_k = 2, 4, 2, 64, 8, 8, 2
    # Peaked attention, as in a trained model: a few keys share directions with the queries.
    k = torch.randn(b, g, t, hd, generator=gen, dtype=torch.float64) * 2.0
    q = k.repeat_interleave(h // g, 1)[:, :, torch.randperm(t, generator=gen)] + torch.randn(b, h, t, hd, generator=gen, dtype=torch.float64)
    v = torch.randn(b, g, t, hd, generator=gen, dtype=torch.float64)
    fitted, rows = fit_log_alpha(q, k, v, None, block=block, top_k=top_k)
    assert bool((rows > 0).all())
    dense = F.scaled_dot_product_attention(q, k.repeat_interleave(h // g, 1), v.repeat_interleave(h // g, 1),
                                           is_causal=True)

    def error(log_alpha):
        y = sparse_linear_attention(q, k, v, None, block=block, top_k=top_k, log_alpha=log_alpha)
        return ((y - dense) ** 2).sum(-1)[:, :, block * (top_k + 1):].mean((0, 2))  # rows with unread keys, per head

    best = error(fitted)
    step = float(ALPHA_OFFSETS[1] - ALPHA_OFFSETS[0])
    for other in (fitted - step, fitted + step, torch.full_like(fitted, NO_RESIDUAL)):
        assert bool((best <= error(other) + 1e-12).all())
