"""Input-conditioned and static FFN pruning, the parts built so far: the compact gathered FFN equals
the masked FFN; the predictor's scores are a function of the prompt only; sparsity 0 is the dense
FFN; hard-concrete L0 gates' expected sparsity matches the realised one; magnitude scores; bad input."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from condcomp.layers.feedforward import FeedForward
from condcomp.layers.prunable_ffn import PrunableFeedForward
from condcomp.routing import RoutingError
from condcomp.routing.channel_mask import (ChannelMaskPredictor, HardConcreteGates, hard_channel_mask, kept_channels,
                                           magnitude_scores)


def _ffn(activation, d=8, d_ff=12, seed=0):
    torch.manual_seed(seed)
    return PrunableFeedForward(d_model=d, d_ff=d_ff, activation=activation).double()


@settings(max_examples=25, deadline=None)
@given(activation=st.sampled_from(["swiglu", "gelu"]), seed=st.integers(0, 10_000), keep=st.integers(1, 12))
def test_the_compact_ffn_equals_the_masked_ffn(activation, seed, keep):
    ffn = _ffn(activation, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    mask = hard_channel_mask(torch.randn(12, generator=gen, dtype=torch.float64), keep)
    x = torch.randn(2, 5, 8, generator=gen, dtype=torch.float64)
    small = ffn.compact(mask)
    assert small.down.in_features == keep
    torch.testing.assert_close(small(x)[0], ffn(x, channel_mask=mask)[0], rtol=1e-12, atol=1e-12)


def test_all_channels_kept_is_the_dense_ffn_and_weights_load_from_a_dense_ffn():
    for activation in ("swiglu", "gelu"):
        torch.manual_seed(0)
        dense = FeedForward(d_model=8, d_ff=12, activation=activation).double()
        ffn = PrunableFeedForward(d_model=8, d_ff=12, activation=activation).double()
        ffn.load_state_dict(dense.state_dict())  # same parameter names and shapes
        x = torch.randn(3, 4, 8, dtype=torch.float64)
        predictor = ChannelMaskPredictor(d_model=8, d_ff=12, n_layers=1).double().train()
        soft = predictor.mask(predictor(x), sparsity=0.0)[:, 0]  # sparsity 0: every weight is 1
        assert torch.equal(soft, torch.ones_like(soft))
        torch.testing.assert_close(ffn(x, channel_mask=soft)[0], dense(x)[0], rtol=0, atol=0)
        torch.testing.assert_close(ffn.compact(torch.ones(12, dtype=torch.bool))(x)[0], dense(x)[0])


def test_per_sequence_masks_apply_to_their_own_sequence():
    ffn = _ffn("swiglu")
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    masks = torch.stack([hard_channel_mask(torch.randn(12, dtype=torch.float64), k) for k in (3, 9)])
    both = ffn(x, channel_mask=masks)[0]
    for i in range(2):
        torch.testing.assert_close(both[i : i + 1], ffn.compact(masks[i])(x[i : i + 1])[0])


def test_the_predictors_scores_are_a_function_of_the_prompt_only():
    torch.manual_seed(0)
    predictor = ChannelMaskPredictor(d_model=16, d_ff=20, n_layers=3).eval()
    hidden = torch.randn(2, 10, 16)
    prompt = torch.zeros(2, 10, dtype=torch.bool)
    prompt[0, :4], prompt[1, :7] = True, True
    scores = predictor(hidden, prompt)
    changed = hidden.clone()
    changed[~prompt] = torch.randn(int((~prompt).sum()), 16) * 10  # later (generated) tokens
    torch.testing.assert_close(predictor(changed, prompt), scores)
    hard = predictor.mask(scores, sparsity=0.5)
    assert hard.dtype == torch.bool and hard.sum(-1).eq(10).all()
    predictor.train()
    soft = predictor.mask(scores, sparsity=0.5)
    assert soft.min() >= 0 and soft.max() <= 1 + 1e-6
    torch.testing.assert_close(soft.sum(-1), torch.full((2, 3), 10.0), rtol=1e-4, atol=1e-4)


def test_hard_concrete_expected_sparsity_matches_the_realised_one():
    torch.manual_seed(0)
    gates = HardConcreteGates(400, init_keep=0.5)
    with torch.no_grad():
        gates.log_alpha.copy_(torch.linspace(-4, 4, 400))
    gen = torch.Generator().manual_seed(1)
    samples = torch.stack([gates.sample(gen) for _ in range(4000)])  # [draws, n]
    realised = (samples > 0).float().mean(0)
    torch.testing.assert_close(realised, gates.expected_kept().detach(), atol=0.03, rtol=0)
    assert samples.min() == 0 and samples.max() == 1  # exact zeros and ones occur
    assert gates.deterministic_mask(0.75).sum() == 100
    assert torch.equal(gates.deterministic_mask(0.75), gates.log_alpha.detach() >= gates.log_alpha.detach().sort().values[300])
    # The Lagrangian is zero at the target and grows either side.
    at = float(1 - gates.expected_kept().detach().mean())
    with torch.no_grad():
        zero = gates.lagrangian(at, torch.tensor(1.0), torch.tensor(1.0))
        assert abs(float(zero)) < 1e-6 and float(gates.lagrangian(at - 0.1, torch.tensor(0.0), torch.tensor(1.0))) > 0


def test_magnitude_scores_rank_a_channel_with_zero_weights_last():
    ffn = _ffn("swiglu")
    with torch.no_grad():
        ffn.down.weight[:, 5] = 0
    scores = magnitude_scores(ffn.up.weight, ffn.down.weight, "swiglu")
    assert scores.shape == (12,) and int(scores.argmin()) == 5
    gelu = _ffn("gelu")
    with torch.no_grad():
        gelu.up.weight[7] = 0
    assert int(magnitude_scores(gelu.up.weight, gelu.down.weight, "gelu").argmin()) == 7


def test_bad_input_is_refused_or_handled_with_a_warning():
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(RoutingError, match=r"sparsity must be in \[0, 1\)"):
            kept_channels(100, bad)
    assert kept_channels(100, 0.999) == 1  # at least one channel
    predictor = ChannelMaskPredictor(d_model=4, d_ff=6, n_layers=1, min_prompt=3)
    with pytest.raises(RoutingError, match="the prompt has 2 tokens but the channel predictor needs at least 3"):
        predictor(torch.randn(1, 5, 4), torch.tensor([[True, True, False, False, False]]))
    ffn = _ffn("gelu")
    with pytest.warns(UserWarning, match="kept no channel"):
        small = ffn.compact(torch.zeros(12, dtype=torch.bool), where="blocks.3.ffn")
    assert small.down.in_features == 1


@pytest.mark.parametrize("ffn", ["swiglu", "gelu"])
def test_a_pruned_model_equals_the_dense_model_with_the_pruned_channels_zeroed(ffn):
    from condcomp.config import ModelConfig, from_dict
    from condcomp.convert.prune import magnitude_masks, prune_ffn_channels
    from condcomp.models import Transformer

    torch.manual_seed(0)
    model = Transformer(from_dict(ModelConfig, dict(d_model=32, n_layers=3, n_heads=4, seq_len=24, ffn=ffn))).double().eval()
    masks = magnitude_masks(model, sparsity=0.5)
    assert {int(m.sum()) for m in masks} == {model.cfg.ffn_hidden // 2}
    small = prune_ffn_channels(model, masks)
    assert small.cfg.d_ff == model.cfg.ffn_hidden // 2
    reference = Transformer(model.cfg).double().eval()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        for blk, m in zip(reference.blocks, masks):
            blk.ffn.down.weight[:, ~m] = 0  # down(h * m) == (down * m) h
    tokens = torch.randint(0, 256, (2, 24))
    torch.testing.assert_close(small(tokens).logits, reference(tokens).logits, rtol=1e-10, atol=1e-10)
    # Sparsity 0 keeps every channel: the same model.
    full = prune_ffn_channels(model, magnitude_masks(model, sparsity=0.0))
    torch.testing.assert_close(full(tokens).logits, model(tokens).logits, rtol=0, atol=0)


def test_pruning_refuses_what_it_cannot_make_into_one_dense_model():
    from condcomp.config import ModelConfig, from_dict
    from condcomp.convert.prune import PruneError, prune_ffn_channels
    from condcomp.models import Transformer

    model = Transformer(from_dict(ModelConfig, dict(d_model=32, n_layers=2, n_heads=4, seq_len=16, ffn="gelu")))
    d_ff = model.cfg.ffn_hidden
    uneven = [torch.arange(d_ff) < 10, torch.arange(d_ff) < 20]
    with pytest.raises(PruneError, match="same number"):
        prune_ffn_channels(model, uneven)
    with pytest.raises(PruneError, match="one per layer"):
        prune_ffn_channels(model, uneven[:1])
    moe = Transformer(from_dict(ModelConfig, dict(d_model=32, n_layers=2, n_heads=4, seq_len=16, ffn="moe")))
    with pytest.raises(PruneError, match="needs a dense model"):
        prune_ffn_channels(moe, uneven)
