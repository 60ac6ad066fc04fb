"""Token-selection layers: routers, sequence dispatch, MoD, LayerSkip, CoLT5 layers, causal decoding."""

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from condcomp.config import ModelConfig, from_dict, load_config
from condcomp.dispatch import dispatch_sequences, dispatch_sequences_reference
from condcomp.layers import (ConditionalAttention, ConditionalFeedForward, LayerSkip, LocalAttention,
                             MixtureOfDepths, ModelCache)
from condcomp.models import Transformer
from condcomp.techniques.dense import transformer_block
from condcomp.routing import BinaryGate, RoutingError, TokenSelectRouter


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(d_model=32, n_layers=2, n_heads=4, seq_len=48)
    base.update(kw)
    return from_dict(ModelConfig, base)


# ----------------------------------------------------------------------------------------------
# Routers


def test_sequence_router_picks_capacity_per_sequence_and_never_padding():
    torch.manual_seed(0)
    router = TokenSelectRouter(d_model=16, capacity=0.25, weighting="soft_top_k")
    x = torch.randn(3, 20, 16)
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1, 12:] = False  # 12 real tokens -> ceil(3) picked
    mask[2, 3:] = False  # 3 real tokens -> 1 picked
    r = router(x, mask)
    rows = r.token_index // 20
    assert torch.bincount(rows, minlength=3).tolist() == [5, 3, 1]
    assert mask.reshape(-1)[r.token_index].all()
    assert torch.equal(r.token_index, r.token_index.sort().values)
    # Picked = the highest scores of each sequence.
    s = router.score(x).squeeze(-1).masked_fill(~mask, float("-inf"))
    for b, n in enumerate([5, 3, 1]):
        assert set((r.token_index[rows == b] - 20 * b).tolist()) == set(s[b].topk(n).indices.tolist())


def test_router_settings_are_checked():
    with pytest.raises(RoutingError, match="capacity"):
        TokenSelectRouter(d_model=8, capacity=0)
    with pytest.raises(RoutingError, match="sigmoid"):
        TokenSelectRouter(d_model=8, capacity=0.5, weighting="soft_top_k", causal_scheme="aux_loss")
    with pytest.raises(RoutingError, match="target_rate"):
        BinaryGate(d_model=8, target_rate=1.5)
    with pytest.raises(RoutingError, match=r"\[batch, seq, d\]"):
        TokenSelectRouter(d_model=8, capacity=0.5)(torch.randn(4, 8))


def test_binary_gate_is_hard_forward_soft_backward():
    torch.manual_seed(0)
    gate = BinaryGate(d_model=8, target_rate=0.5)
    x = torch.randn(2, 30, 8)
    r = gate(x)
    assert torch.equal(r.combine_weights, torch.ones_like(r.combine_weights))
    r.combine_weights.sum().backward()
    assert gate.gate.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------
# Sequence dispatch: fast == reference (outputs and gradients), ragged selections included


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(2, 12), seed=st.integers(0, 2**16))
def test_sequence_dispatch_matches_reference(b, t, seed):
    g = torch.Generator().manual_seed(seed)
    d = 6
    x = torch.randn(b, t, d, generator=g, dtype=torch.float64)
    gate = BinaryGate(d_model=d, target_rate=0.5).double()
    torch.nn.init.normal_(gate.gate.weight, std=1.0, generator=g)
    gate.eval()
    routing = gate(x)  # ragged: each sequence keeps a different number of tokens
    routing.combine_weights = torch.rand(routing.combine_weights.shape, generator=g, dtype=torch.float64)
    lin = torch.nn.Linear(d, d).double()

    def fn(xs, pack):  # depends on order and positions within the pack, like attention would
        return torch.tanh(lin(xs)).cumsum(1) + pack.positions[..., None].to(xs.dtype)

    x1 = x.clone().requires_grad_()
    y1 = dispatch_sequences(x1, routing, fn)
    x2 = x.clone().requires_grad_()
    y2 = dispatch_sequences_reference(x2, routing, fn)
    torch.testing.assert_close(y1, y2)
    if routing.token_index.numel() == 0:
        assert (y1 == 0).all()
        return
    up = torch.randn(y1.shape, generator=g, dtype=torch.float64)
    (y1 * up).sum().backward()
    (y2 * up).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)


# ----------------------------------------------------------------------------------------------
# Capacity 1.0 == the dense block


def _copy_block(cfg, layer_idx=0):
    torch.manual_seed(1)
    dense = transformer_block(model=cfg, layer_idx=layer_idx).double()
    twin = transformer_block(model=cfg, layer_idx=layer_idx).double()
    twin.load_state_dict(dense.state_dict())
    return dense, twin


def test_mod_at_full_capacity_with_soft_top_k_equals_the_dense_block():
    cfg = tiny_cfg()
    dense, twin = _copy_block(cfg)
    mod = MixtureOfDepths(twin, d_model=32, capacity=1.0, weighting="soft_top_k", causal_scheme=None).double()
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, _ = dense(x1)
    y2, _ = mod(x2)
    torch.testing.assert_close(y1, y2)
    up = torch.randn_like(y1)
    (y1 * up).sum().backward()
    (y2 * up).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    for (name, p1), p2 in zip(dense.named_parameters(), mod.block.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, msg=name)


def test_mod_at_full_capacity_with_sigmoid_weights_scales_the_dense_update():
    cfg = tiny_cfg()
    dense, twin = _copy_block(cfg)
    mod = MixtureOfDepths(twin, capacity=1.0).double()
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    y_dense, _ = dense(x)
    w = torch.sigmoid(mod.router.score(x))
    y, _ = mod(x)
    torch.testing.assert_close(y, x + w * (y_dense - x))


def test_skip_with_every_token_running_equals_the_dense_block():
    cfg = tiny_cfg()
    dense, twin = _copy_block(cfg)
    skip = LayerSkip(twin).double().eval()
    with torch.no_grad():
        skip.router.gate.bias.copy_(torch.tensor([-100.0, 100.0]))  # every token runs
    x = torch.randn(2, 16, 32, dtype=torch.float64)
    torch.testing.assert_close(skip(x)[0], dense(x)[0])


def test_conditional_ffn_at_full_capacity_is_light_plus_heavy():
    torch.manual_seed(0)
    cff = ConditionalFeedForward(d_model=16, light_d_ff=8, heavy_d_ff=32, capacity=1.0).double()
    x = torch.randn(2, 10, 16, dtype=torch.float64, requires_grad=True)
    y, _ = cff(x)
    torch.testing.assert_close(y, cff.light(x)[0] + cff.heavy(x)[0])


def test_conditional_ffn_matches_masked_dense_reference():
    torch.manual_seed(0)
    cff = ConditionalFeedForward(d_model=16, light_d_ff=8, heavy_d_ff=32, capacity=0.25).double()
    x = torch.randn(2, 12, 16, dtype=torch.float64)
    y, _ = cff(x)
    r = cff.router(x)
    w = torch.zeros(24, dtype=torch.float64)
    w[r.token_index] = r.combine_weights
    ref = cff.light(x)[0] + w.view(2, 12, 1) * cff.heavy(x)[0]
    torch.testing.assert_close(y, ref)


# ----------------------------------------------------------------------------------------------
# Attention references


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("t,window", [(13, 4), (16, 4), (5, 8)])
def test_local_attention_matches_dense_banded_reference(causal, t, window):
    torch.manual_seed(0)
    att = LocalAttention(d_model=16, n_heads=2, head_dim=4, window=window, causal=causal, max_len=32).double()
    x = torch.randn(2, t, 16, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(2, t, dtype=torch.bool)
    mask[1, t - 2 :] = False
    y = att(x, mask)
    # Reference: full attention with an explicit [t, t] band.
    q, k, v = att.qkv(x).view(2, t, 3, 2, 4).permute(2, 0, 3, 1, 4)
    q, k = att.rotary.apply(q), att.rotary.apply(k)
    i = torch.arange(t)
    diff = i[:, None] - i[None, :]
    band = (diff >= 0) & (diff <= window) if causal else diff.abs() <= window
    allowed = band[None] & mask[:, None, :]
    allowed = allowed | ~mask[:, :, None]
    ref = att.out(F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None]).transpose(1, 2).reshape(2, t, 8))
    torch.testing.assert_close(y[mask], ref[mask])
    g1 = torch.autograd.grad(y[mask].sum(), x)[0]
    g2 = torch.autograd.grad(ref[mask].sum(), x)[0]
    torch.testing.assert_close(g1, g2)


@pytest.mark.parametrize("causal", [False, True])
def test_conditional_attention_heavy_branch_matches_dense_masked_reference(causal):
    torch.manual_seed(0)
    att = ConditionalAttention(d_model=16, n_heads=2, max_len=32, causal=causal, window=3, q_capacity=0.25,
                               kv_capacity=0.5).double()
    b, t = 2, 12
    x = torch.randn(b, t, 16, dtype=torch.float64, requires_grad=True)
    y, _ = att(x)
    heavy = y - att.light(x)
    # Reference over all tokens: keys/values of every token scaled by its kv weight (0 if unrouted),
    # keys restricted to routed ones, outputs kept only for routed queries, scaled by their weight.
    qr, kvr = att.q_router(x), att.kv_router(x)
    wq = torch.zeros(b * t, dtype=torch.float64).index_put((qr.token_index,), qr.combine_weights).view(b, t)
    wkv = torch.zeros(b * t, dtype=torch.float64).index_put((kvr.token_index,), kvr.combine_weights).view(b, t)
    kv_on = torch.zeros(b * t, dtype=torch.bool).index_fill(0, kvr.token_index, True).view(b, t)
    k, v = att.kv(x * wkv[..., None]).view(b, t, 2, 2, 8).permute(2, 0, 3, 1, 4)
    q = att.q(x).view(b, t, 2, 8).transpose(1, 2)
    q, k = att.rotary.apply(q), att.rotary.apply(k)
    allowed = kv_on[:, None, :].expand(b, t, t)
    if causal:
        allowed = allowed & torch.ones(t, t, dtype=torch.bool).tril()
    has_key = allowed.any(-1)
    allowed = allowed | ~has_key[..., None]
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None]).transpose(1, 2).reshape(b, t, 16)
    ref = wq[..., None] * att.out(o) * has_key[..., None]
    torch.testing.assert_close(heavy, ref)
    g1 = torch.autograd.grad((heavy * torch.arange(16.0, dtype=torch.float64)).sum(), x, retain_graph=True)[0]
    g2 = torch.autograd.grad((ref * torch.arange(16.0, dtype=torch.float64)).sum(), x)[0]
    torch.testing.assert_close(g1, g2)


# ----------------------------------------------------------------------------------------------
# Causality: perturbing tokens after t never changes outputs at <= t


CAUSAL_MODELS = {
    "mod-aux_loss": dict(block="mod", mod={"every": 1, "capacity": 0.25}),
    "mod-predictor": dict(block="mod", mod={"every": 1, "capacity": 0.25, "causal_scheme": "predictor"}),
    "skip": dict(block="skip"),
    "conditional-ffn": dict(ffn="conditional", conditional={"capacity": 0.25}),
    "conditional-attention": dict(attention="conditional", conditional={"window": 4, "q_capacity": 0.25}),
}


def _trained_a_little(model: Transformer, steps: int = 3) -> Transformer:
    """A few SGD steps so routers and thresholds are not at their symmetric initial values."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randint(0, 256, (4, 40), generator=g)
        out = model(x)
        loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, 256), x[:, 1:].reshape(-1))
        (loss + sum(out.aux_losses.values())).backward()
        opt.step()
        opt.zero_grad()
    return model


def _diverse_routing(model: Transformer) -> Transformer:
    """Random router parameters on a unit scale, so about half the tokens are computed at inference
    (a freshly built gate runs everything; a predictor may start all on one side)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, BinaryGate):
                m.gate.weight.copy_(torch.randn(m.gate.weight.shape, generator=g))
                m.gate.bias.zero_()
    # Predictors: centre each one's logits on a calibration batch so it splits the tokens.
    for m in model.modules():
        if isinstance(m, TokenSelectRouter) and m.predictor is not None:
            seen = []
            hook = m.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
            with torch.no_grad():
                model(torch.randint(0, 256, (4, 40), generator=g))
                hook.remove()
                logits = m.predictor(seen[0]).flatten().sort().values
                half = logits.numel() // 2  # midway between two tokens: no token sits on the boundary
                m.predictor[-1].bias -= (logits[half - 1] + logits[half]) / 2
    return model


@pytest.fixture(scope="module")
def causal_models():
    torch.manual_seed(0)
    return {name: _diverse_routing(_trained_a_little(Transformer(tiny_cfg(**kw)))).eval()
            for name, kw in CAUSAL_MODELS.items()}


@pytest.mark.parametrize("name", sorted(CAUSAL_MODELS))
@settings(max_examples=8, deadline=None)
@given(t=st.integers(0, 38), seed=st.integers(0, 2**16))
def test_no_look_ahead_at_inference(causal_models, name, t, seed):
    model = causal_models[name]
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (2, 40), generator=g)
    y = x.clone()
    y[:, t + 1 :] = torch.randint(0, 256, (2, 39 - t), generator=g)
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-5)


def test_skip_is_causal_in_training_too():
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(block="skip"))
    model.train()
    emb = model.embed(torch.randint(0, 256, (1, 24))).detach().requires_grad_()
    torch.manual_seed(5)  # same Gumbel noise for the whole pass
    h = emb
    for block in model.blocks:
        h, _ = block(h)
    h[0, 10].sum().backward()
    assert emb.grad[0, 11:].abs().max() == 0 and emb.grad[0, :11].abs().max() > 0


def test_decoder_refuses_a_look_ahead_sequence_router():
    from condcomp import registry

    cfg = tiny_cfg()
    model = Transformer(cfg)
    with pytest.raises(ValueError, match="not causal"):
        model.blocks[0] = MixtureOfDepths(model.blocks[0], d_model=32, weighting="soft_top_k", causal_scheme=None)
        model._refuse_look_ahead()
    assert "mod" in registry.names("block")


# ----------------------------------------------------------------------------------------------
# Incremental decoding == full forward (inference mode)


@pytest.mark.parametrize("name", ["mod-aux_loss", "mod-predictor", "skip", "conditional-ffn"])
def test_incremental_decoding_matches_full_forward(causal_models, name):
    model = causal_models[name]
    assert model.supports_cache
    x = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(x).logits
        cache = ModelCache()
        parts = [model(x[:, :7], cache=cache).logits]
        parts += [model(x[:, i : i + 1], cache=cache).logits for i in range(7, 40)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)
    # Skipping tokens write no cache: the selecting layers cache fewer keys than tokens seen.
    if name.startswith(("mod", "skip")):
        lengths = [int(c.length.sum()) for c in cache.layers.values()]
        assert min(lengths) < 3 * 40


def test_generate_with_cache_equals_generate_by_recomputation(causal_models):
    model = causal_models["mod-aux_loss"]
    prompt = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(2))
    fast = model.generate(prompt, 20, temperature=0)
    original = type(model).supports_cache
    try:
        type(model).supports_cache = property(lambda self: False)
        slow = model.generate(prompt, 20, temperature=0)
    finally:
        type(model).supports_cache = original
    assert torch.equal(fast, slow)


def test_conditional_attention_model_falls_back_to_recomputation(causal_models):
    model = causal_models["conditional-attention"]
    assert not model.supports_cache
    with pytest.raises(ValueError, match="cannot decode incrementally"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=ModelCache())
    assert model.generate(torch.zeros(1, 3, dtype=torch.long), 4, temperature=0).shape == (1, 7)


# ----------------------------------------------------------------------------------------------
# Training behaviour


def test_skip_rate_regulariser_moves_the_rate_toward_the_target():
    torch.manual_seed(0)
    target = 0.3
    model = Transformer(tiny_cfg(block="skip", skip={"target_rate": target}))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)

    def realised_rate():
        model.eval()
        with torch.no_grad():
            m = model(torch.randint(0, 256, (8, 40), generator=torch.Generator().manual_seed(9))).metrics
        model.train()
        return sum(float(v) for k, v in m.items() if k.endswith("router.fraction_selected")) / 2

    before = realised_rate()
    for _ in range(60):
        x = torch.randint(0, 256, (4, 40), generator=g)
        out = model(x)
        loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, 256), x[:, 1:].reshape(-1))
        (loss + 1.0 * out.aux_losses["skip_rate"]).backward()
        opt.step()
        opt.zero_grad()
    after = realised_rate()
    assert before > 0.8  # tokens start by running the block
    assert abs(after - target) < 0.5 * abs(before - target), (before, after)


def test_mod_router_learns_to_predict_top_k_membership():
    torch.manual_seed(0)
    model = Transformer(tiny_cfg(block="mod", mod={"every": 1, "capacity": 0.25}))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    acc = []
    for _ in range(80):
        x = torch.randint(0, 256, (4, 40), generator=g)
        out = model(x)
        loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, 256), x[:, 1:].reshape(-1))
        (loss + out.aux_losses["router_bce"]).backward()
        opt.step()
        opt.zero_grad()
        acc.append(float(out.metrics["layer0.router.predictor_accuracy"]))
    early, late = sum(acc[:10]) / 10, sum(acc[-10:]) / 10
    assert late > 0.88 and late > early + 0.08, (early, late)


@pytest.mark.parametrize("name", ["mod", "skip", "colt5"])
def test_example_configs_train_a_few_steps(name, text_file, tmp_path):
    from conftest import tiny_overrides

    from condcomp.train import Trainer

    sets = tiny_overrides(text_file, tmp_path / name, tmp_path / "cache", **{"train.steps": 3, "train.eval_every": 3})
    sets = [s for s in sets if not s.startswith(("model.", "train.precision"))]
    cfg = load_config(f"configs/{name}.yaml", sets + ["model.d_model=32", "model.n_heads=2", "model.seq_len=32"])
    result = Trainer(cfg).train()
    assert result.val_bpb is not None
    record = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
    assert any(k.endswith("fraction_selected") for k in record)
