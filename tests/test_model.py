import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from condcomp.config import ModelConfig
from condcomp.models import Transformer


def tiny(**kw):
    cfg = dict(d_model=32, n_layers=2, n_heads=2, seq_len=24)
    cfg.update(kw)
    torch.manual_seed(0)
    return Transformer(ModelConfig(**cfg)).eval()


@settings(max_examples=15, deadline=None)
@given(t=st.integers(0, 22), ffn=st.sampled_from(["swiglu", "gelu"]), seed=st.integers(0, 2**16))
def test_changing_bytes_after_t_never_changes_logits_up_to_t(t, ffn, seed):
    model = tiny(ffn=ffn)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (2, 24), generator=g)
    y = x.clone()
    y[:, t + 1 :] = torch.randint(0, 256, (2, 24 - t - 1), generator=g)
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-5)


def test_gradient_flows_only_from_the_past():
    model = tiny()
    emb = torch.randn(1, 24, 32, requires_grad=True)
    x = emb
    for block in model.blocks:
        x, _ = block(x)
    x[0, 10].sum().backward()
    assert emb.grad[0, 11:].abs().max() == 0 and emb.grad[0, :11].abs().max() > 0


def test_batch_invariance():
    model = tiny()
    x = torch.randint(0, 256, (3, 24))
    with torch.no_grad():
        together = model(x).logits
        alone = torch.cat([model(x[i : i + 1]).logits for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_embeddings_are_tied_and_params_counted_once():
    model = tiny()
    assert model.lm_head.weight is model.embed.weight
    assert model.num_parameters() == sum(p.numel() for p in set(model.parameters()))


def test_float64_gradcheck_small_shapes():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(d_model=8, n_layers=1, n_heads=2, seq_len=6)).double()
    x = torch.randint(0, 256, (1, 6))
    # The input -> output Jacobian through every block, norm and the tied head.
    emb = model.embed(x).detach().requires_grad_(True)

    def run(e):
        h = e
        for block in model.blocks:
            h, _ = block(h)
        return model.lm_head(model.norm(h))

    assert torch.autograd.gradcheck(run, (emb,), eps=1e-6, atol=1e-5)


def test_too_long_input_is_rejected():
    with pytest.raises(ValueError, match="exceeds model seq_len"):
        tiny()(torch.zeros(1, 25, dtype=torch.long))


def test_generate_extends_prompt_deterministically():
    model = tiny()
    p = torch.randint(0, 256, (1, 5))
    a = model.generate(p, 30, temperature=0.9, top_k=10, generator=torch.Generator().manual_seed(1))
    b = model.generate(p, 30, temperature=0.9, top_k=10, generator=torch.Generator().manual_seed(1))
    assert a.shape == (1, 35) and torch.equal(a, b) and torch.equal(a[:, :5], p)


def test_fused_rotary_equals_the_reference_formula_on_outputs_and_gradients():
    from condcomp.layers.rotary import Rotary, _Rotate, rotate_reference

    rot = Rotary(16, 40).double()
    x = torch.randn(2, 3, 10, 16, dtype=torch.float64, requires_grad=True)
    pos = torch.randint(0, 40, (2, 10))
    for fused, (cos, sin) in ((lambda x: rot.apply(x, 5), (rot.cos[5:15], rot.sin[5:15])),
                              (lambda x: rot.apply_at(x, pos), (rot.cos[pos][:, None], rot.sin[pos][:, None]))):
        y, y_ref = fused(x), rotate_reference(x, cos, sin)
        torch.testing.assert_close(y, y_ref)
        g = torch.randn_like(y)
        torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(y_ref, x, g)[0])
    c, s = rot.cos_full[:10], rot.sin_signed[:10]
    assert torch.autograd.gradcheck(lambda x: _Rotate.apply(x, c, s), (x[:1, :1],))
    xt = x.detach().transpose(1, 2).float()                           # a non-contiguous view, as q is
    torch.testing.assert_close(_Rotate.apply(xt, c.float()[:, None], s.float()[:, None]),
                               rotate_reference(xt, rot.cos[:10].float()[:, None], rot.sin[:10].float()[:, None]))
