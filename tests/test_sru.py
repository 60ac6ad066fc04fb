"""SRU / SRU++: the fused recurrence against its reference, and the properties of the layers."""

from __future__ import annotations

import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from condcomp.config import ConfigError, ModelConfig
from condcomp.techniques.sru import RecurrenceSettings
from condcomp.layers import SRU, SRUpp
from condcomp.layers import sru_native
from condcomp.layers.sru_recurrence import sru_recurrence
from condcomp.models import Transformer


def recurrence_inputs(t=7, b=3, d=5, dtype=torch.float64, seed=0):
    """u [T, B, 3, d], xs [T, B, d], v [2, d], b [2, d], c0 [B, d]."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(t, b, 3, d), (t, b, d), (2, d), (2, d), (b, d)]
    return [torch.randn(*s, generator=g, dtype=dtype).requires_grad_(True) for s in shapes]


def ragged_mask(t, b, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    lengths[0] = t
    return torch.arange(t)[:, None] < lengths[None, :]       # [T, B]


def copy_with_reference_path(model):
    for layer in model.layers:
        layer.fast = not layer.fast
    return model


@pytest.fixture(params=[64, 3], ids=["one-chunk", "chunks-of-3"])
def chunk(request, monkeypatch):
    """Run the PyTorch fused path with its default chunk and with chunks of 3 steps (chunk edges inside)."""
    import condcomp.layers.sru_recurrence as rec

    monkeypatch.setattr(rec, "CHUNK", request.param)
    return request.param


@pytest.fixture(params=["native", "pytorch-one-chunk", "pytorch-chunks-of-3"])
def fast_path(request, monkeypatch):
    """Each fast path a float32 CPU recurrence can take: the compiled kernel and the PyTorch path
    (default chunk and chunks of 3 steps)."""
    import condcomp.layers.sru_recurrence as rec

    if request.param == "native":
        if sru_native.kernel() is None:
            pytest.skip("no C compiler here: the compiled kernel cannot be built")
        monkeypatch.setattr(rec, "NATIVE", "auto")
    else:
        monkeypatch.setattr(rec, "NATIVE", "never")
        monkeypatch.setattr(rec, "CHUNK", 3 if request.param.endswith("3") else 64)
    return request.param


@pytest.mark.parametrize("masked", [False, True])
def test_fused_recurrence_float64_gradcheck(masked, chunk):
    args = recurrence_inputs()
    real = ragged_mask(7, 3) if masked else None
    assert torch.autograd.gradcheck(lambda *a: sru_recurrence(*a, real), args)


@pytest.mark.parametrize("masked", [False, True])
def test_fused_recurrence_equals_reference_on_outputs_states_and_gradients(masked, fast_path):
    args = recurrence_inputs(t=40, b=4, d=16, dtype=torch.float32)
    real = ragged_mask(40, 4) if masked else None
    h, c = sru_recurrence(*args, real)
    h_ref, c_ref = sru_recurrence(*args, real, fast=False)
    assert torch.allclose(h, h_ref, atol=1e-5) and torch.allclose(c, c_ref, atol=1e-5)
    gh, gc = torch.randn_like(h), torch.randn_like(c)
    grads = torch.autograd.grad((h * gh).sum() + (c * gc).sum(), args)
    grads_ref = torch.autograd.grad((h_ref * gh).sum() + (c_ref * gc).sum(), args)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4), (a - b).abs().max()


needs_kernel = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                  reason="no C compiler: the PyTorch path runs instead")


@needs_kernel
def test_kernel_builds_once_into_the_cache_and_loads_from_it(tmp_path, monkeypatch):
    monkeypatch.setenv("CONDCOMP_CACHE", str(tmp_path))
    monkeypatch.setattr(sru_native, "_state", {})
    assert sru_native.kernel() is not None
    built = list(tmp_path.glob("sru_kernel-*.so"))
    assert built == [sru_native.library_path()]
    stamp = built[0].stat().st_mtime_ns
    monkeypatch.setattr(sru_native, "_state", {})          # a new process: loads, does not rebuild
    assert sru_native.kernel() is not None and built[0].stat().st_mtime_ns == stamp
    assert not list(tmp_path.glob("*.tmp"))


def test_without_a_working_compiler_the_pytorch_path_runs_with_a_warning(tmp_path, monkeypatch):
    import condcomp.layers.sru_recurrence as rec

    monkeypatch.setenv("CONDCOMP_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")                       # a "compiler" that always fails
    monkeypatch.setattr(sru_native, "_state", {})
    args = recurrence_inputs(t=6, b=2, d=4, dtype=torch.float32)
    with pytest.warns(UserWarning, match="compiled kernel is unavailable"):
        h, c = sru_recurrence(*args)
    assert not rec._use_native(args[0])
    h_ref, c_ref = sru_recurrence(*args, fast=False)
    assert torch.allclose(h, h_ref, atol=1e-5) and torch.allclose(c, c_ref, atol=1e-5)
    monkeypatch.setenv("CONDCOMP_NATIVE", "0")              # switched off: no build is tried, no warning
    monkeypatch.setattr(sru_native, "_state", {})
    assert sru_native.kernel() is None


@needs_kernel
@pytest.mark.parametrize("mask", ["none", "per-step", "per-channel"])
def test_kernel_equals_pytorch_path_on_strided_inputs_and_masks(mask, monkeypatch):
    """u as a view into a wider projection (as the layer passes it), odd widths, both mask forms."""
    import condcomp.layers.sru_recurrence as rec

    g = torch.Generator().manual_seed(7)
    t, b, d = 33, 3, 70                                      # d not a multiple of the kernel's block
    u = torch.randn(t, b, 4, d, generator=g)[:, :, 1:].requires_grad_(True)
    rest = [torch.randn(*s, generator=g).requires_grad_(True) for s in [(t, b, d), (2, d), (2, d), (b, d)]]
    real = {"none": None, "per-step": torch.rand(t, b, generator=g) > 0.3,
            "per-channel": torch.rand(t, b, d, generator=g) > 0.3}[mask]
    gh, gc = torch.randn(t, b, d, generator=g), torch.randn(b, d, generator=g)
    results = {}
    for backend in ("auto", "never"):
        monkeypatch.setattr(rec, "NATIVE", backend)
        assert rec._use_native(u) == (backend == "auto")
        h, c = sru_recurrence(u, *rest, real)
        grads = torch.autograd.grad((h * gh).sum() + (c * gc).sum(), [u, *rest])
        results[backend] = (h, c, *grads)
    for a, b_ in zip(results["auto"], results["never"]):
        assert torch.allclose(a, b_, atol=1e-5, rtol=1e-4), (a - b_).abs().max()


@needs_kernel
def test_kernel_reads_bf16_projections_without_a_float32_copy_and_returns_their_gradient_in_bf16(monkeypatch):
    """Under autocast the projection u is bf16: the kernel reads it as is and computes in float32, so
    it equals the PyTorch path on u.float(); du comes back in bf16 (rounded from the same float32)."""
    import condcomp.layers.sru_recurrence as rec

    args = recurrence_inputs(t=30, b=3, d=40, dtype=torch.float32, seed=5)
    u16 = args[0].detach().bfloat16().requires_grad_(True)
    u32 = u16.detach().float().requires_grad_(True)
    gh, gc = torch.randn(30, 3, 40), torch.randn(3, 40)
    monkeypatch.setattr(rec, "NATIVE", "auto")
    h, c = sru_recurrence(u16, *args[1:])
    du16, *rest16 = torch.autograd.grad((h * gh).sum() + (c * gc).sum(), [u16, *args[1:]])
    monkeypatch.setattr(rec, "NATIVE", "never")
    h_ref, c_ref = sru_recurrence(u32, *args[1:])
    du32, *rest32 = torch.autograd.grad((h_ref * gh).sum() + (c_ref * gc).sum(), [u32, *args[1:]])
    assert h.dtype == torch.float32 and du16.dtype == torch.bfloat16
    assert torch.allclose(h, h_ref, atol=1e-5) and torch.allclose(c, c_ref, atol=1e-5)
    assert torch.equal(du16, du32.bfloat16()) or torch.allclose(du16.float(), du32, rtol=8e-3, atol=1e-5)
    for a, b_ in zip(rest16, rest32):
        assert torch.allclose(a, b_, atol=1e-4, rtol=1e-4)


@needs_kernel
def test_kernel_propagates_nan():
    args = recurrence_inputs(t=5, b=2, d=20, dtype=torch.float32)
    with torch.no_grad():
        args[0][2, 1, 1, 3] = float("nan")
    h, c = sru_recurrence(*args)
    assert h[2:, 1, 3].isnan().all() and c[1, 3].isnan() and not h[:, 0].isnan().any()


LAYER_CASES = [
    dict(input_size=8, hidden_size=8),                                 # highway adds the input
    dict(input_size=6, hidden_size=8),                                 # highway projection (k = 4)
    dict(input_size=8, hidden_size=4, bidirectional=True),
    dict(input_size=5, hidden_size=4, bidirectional=True, layer_norm=True),
]


@pytest.mark.parametrize("options", LAYER_CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_sru_fast_path_equals_reference_path_including_all_gradients(options, masked, fast_path):
    torch.manual_seed(0)
    model = SRU(num_layers=2, **options)
    x = torch.randn(12, 3, options["input_size"], requires_grad=True)
    real = ragged_mask(12, 3, seed=2) if masked else None
    c0 = torch.randn(2, 3, model.hidden_size * model.dirs)
    y, c = model(x, c0, real)
    params = [x, *model.parameters()]
    grads = torch.autograd.grad(y.pow(2).sum() + c.sum(), params)
    y_ref, c_ref = copy_with_reference_path(model)(x, c0, real)
    grads_ref = torch.autograd.grad(y_ref.pow(2).sum() + c_ref.sum(), params)
    assert torch.allclose(y, y_ref, atol=1e-5) and torch.allclose(c, c_ref, atol=1e-5)
    for a, b in zip(grads, grads_ref):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("options", LAYER_CASES)
def test_padding_is_ignored_and_the_final_state_is_the_last_real_steps(options):
    torch.manual_seed(1)
    model = SRU(num_layers=2, **options).eval()
    x = torch.randn(10, 4, options["input_size"])
    real = ragged_mask(10, 4, seed=3)
    y, c = model(x, padding_mask=real)
    for i in range(4):
        n = int(real[:, i].sum())
        y_i, c_i = model(x[:n, i:i + 1])
        assert torch.allclose(y[:n, i], y_i[:, 0], atol=1e-5)
        assert torch.allclose(c[:, i], c_i[:, 0], atol=1e-5)
        assert (y[n:, i] == 0).all()


def test_batch_first_and_batch_invariance():
    torch.manual_seed(2)
    model = SRU(6, 6, 2, batch_first=True).eval()
    x = torch.randn(5, 9, 6)
    y, _ = model(x)
    alone = torch.cat([model(x[i:i + 1])[0] for i in range(5)])
    assert y.shape == (5, 9, 6) and torch.allclose(y, alone, atol=1e-6)


def test_state_carried_across_chunks_equals_one_long_sequence():
    torch.manual_seed(3)
    model = SRU(4, 4, 3).eval()
    x = torch.randn(20, 2, 4)
    y, c = model(x)
    y1, c1 = model(x[:8])
    y2, c2 = model(x[8:], c1)
    assert torch.allclose(torch.cat([y1, y2]), y, atol=1e-6) and torch.allclose(c2, c, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(cut=st.integers(1, 11), seed=st.integers(0, 1000), attention=st.booleans())
def test_unidirectional_outputs_never_depend_on_later_steps(cut, seed, attention):
    torch.manual_seed(seed)
    model = (SRUpp(6, 6, 2, n_heads=2, attn_size=4) if attention else SRU(6, 6, 2)).eval()
    x = torch.randn(12, 2, 6)
    changed = x.clone()
    changed[cut:] = torch.randn(12 - cut, 2, 6)
    assert torch.allclose(model(x)[0][:cut], model(changed)[0][:cut], atol=1e-6)


def test_srupp_padding_is_ignored():
    torch.manual_seed(4)
    model = SRUpp(8, 8, 2, n_heads=2, attn_every=1).eval()
    x = torch.randn(9, 3, 8)
    real = ragged_mask(9, 3, seed=5)
    y, c = model(x, padding_mask=real)
    for i in range(3):
        n = int(real[:, i].sum())
        y_i, c_i = model(x[:n, i:i + 1])
        assert torch.allclose(y[:n, i], y_i[:, 0], atol=1e-5) and torch.allclose(c[:, i], c_i[:, 0], atol=1e-5)


def test_srupp_starts_with_zero_attention_weight_and_attends_only_every_nth_layer():
    model = SRUpp(8, 8, 4, attn_every=2)
    attends = [layer.attends for layer in model.layers]
    assert attends == [False, True, False, True]
    assert all(layer.input_proj.alpha.item() == 0.0 for layer in model.layers if layer.attends)


def test_paper_initialisation():
    layer = SRU(64, 64, 1, highway_bias=-2.0).layers[0]
    assert layer.input_proj.weight.abs().max() <= (3 / 64) ** 0.5
    assert layer.v.abs().max() <= (3 * 0.5) ** 0.5
    assert (layer.b[:, 0] == 0).all() and (layer.b[:, 1] == -2.0).all()
    assert layer.alpha == pytest.approx((1 + 2 * torch.e ** -2.0) ** 0.5)


def test_bad_arguments_fail_with_the_fix_named():
    with pytest.raises(ValueError, match="dropout"):
        SRU(4, 4, dropout=1.5)
    with pytest.raises(ValueError, match="c0 must have shape"):
        SRU(4, 4, 2)(torch.randn(3, 2, 4), torch.zeros(1, 2, 4))
    with pytest.raises(ConfigError, match="attn_heads"):
        ModelConfig(d_model=64, n_heads=2, block="srupp", recurrence=RecurrenceSettings(attn_heads=3))


@pytest.mark.parametrize("block", ["sru", "srupp"])
def test_recurrent_language_model_is_causal_and_learns(block):
    torch.manual_seed(5)
    model = Transformer(ModelConfig(d_model=32, n_layers=2, n_heads=2, seq_len=32, block=block))
    tokens = torch.randint(0, 256, (2, 20))
    changed = tokens.clone()
    changed[:, 12:] = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        assert torch.allclose(model(tokens).logits[:, :12], model(changed).logits[:, :12], atol=1e-5)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = torch.randint(0, 16, (4, 21))
    losses = []
    for _ in range(30):
        logits = model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
