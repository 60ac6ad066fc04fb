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
    with pytest.raises(PruneError, match="needs a dense or prunable model"):
        prune_ffn_channels(moe, uneven)


# -- ffn: prunable in whole models -------------------------------------------------------------------

P, T = 6, 16


def _prunable(method, *, sparsity=0.5, seed=0, **extra):
    from condcomp.config import ModelConfig, from_dict
    from condcomp.models import Transformer

    torch.manual_seed(seed)
    cfg = from_dict(ModelConfig, dict(d_model=16, n_layers=2, n_heads=2, seq_len=T, ffn="prunable",
                                      prunable=dict(method=method, sparsity=sparsity, prompt_len=P, **extra)))
    model = Transformer(cfg).double()
    if method == "conditioned":  # predictors whose output varies with the prompt as much as the bias
        for blk in model.blocks:
            torch.nn.init.normal_(blk.ffn.predictor.net[-1].weight, std=1.0)
    return model.eval()


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), j=st.integers(P, T - 1))
def test_conditioned_masks_read_the_prompt_only_and_outputs_from_its_last_position_are_causal(seed, j):
    from condcomp.convert.prune import prompt_masks

    model = _prunable("conditioned", seed=seed)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (3, T), generator=gen)
    later = x.clone()
    later[:, j:] = torch.randint(0, 256, (3, T - j), generator=gen)  # change position j and after
    assert torch.equal(prompt_masks(model, x), prompt_masks(model, later))
    with torch.no_grad():
        a, b = model(x).logits, model(later).logits
    # Every output before j is unchanged; that includes positions P - 1 .. j - 1, the ones trained.
    torch.testing.assert_close(a[:, :j], b[:, :j], rtol=0, atol=0)


def test_the_prompt_does_choose_the_channels():
    """The property above must not hold trivially: different prompts get different channels."""
    from condcomp.convert.prune import prompt_masks

    model = _prunable("conditioned")
    x = torch.randint(0, 256, (8, T), generator=torch.Generator().manual_seed(0))
    masks = prompt_masks(model, x)  # [L, 8, d_ff]
    assert masks.sum(-1).eq(model.cfg.ffn_hidden // 2).all()
    assert not all(torch.equal(masks[:, 0], masks[:, i]) for i in range(1, 8))


@pytest.mark.parametrize("method", ["conditioned", "static", "magnitude"])
def test_the_compact_model_is_the_prunable_model_and_decodes_the_same(method):
    from condcomp.convert.prune import compact, compact_for_prompt, for_generation, generate

    model = _prunable(method)
    x = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(1))
    small = compact_for_prompt(model, x) if method == "conditioned" else compact(model)
    assert small.cfg.ffn == "swiglu" and small.cfg.d_ff == model.cfg.ffn_hidden // 2
    with torch.no_grad():
        torch.testing.assert_close(small(x).logits[:, P - 1 :], model(x).logits[:, P - 1 :], rtol=1e-12, atol=1e-12)
    if method == "conditioned":  # per-prompt compaction copies the kept FFN channels only
        assert small.embed.weight.data_ptr() == model.embed.weight.data_ptr()
    else:
        assert small.embed.weight.data_ptr() != model.embed.weight.data_ptr()
    assert small.lm_head.weight is small.embed.weight
    # Greedy decoding as deployed (compact model, KV cache; for a conditioned model, the cache of its
    # masked pass over the prompt) == re-running the prunable model on the whole text each step
    # (its masks stay those of the first P tokens).
    ref = x
    with torch.no_grad():
        for _ in range(5):
            ref = torch.cat([ref, model(ref).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(generate(model, x, 5, temperature=0), ref)
    assert torch.equal(for_generation(model, x).generate(x, 5, temperature=0), ref)


@pytest.mark.parametrize("method", ["conditioned", "magnitude"])
def test_the_sparsity_ramp_starts_at_the_dense_model_and_reaches_the_target(method):
    from condcomp.layers.traits import set_training_progress

    from condcomp.layers.feedforward import FeedForward
    from condcomp.layers.traits import set_training_progress

    model = _prunable(method, ramp=0.5).train()
    for progress, sparsity in ((0.0, 0.0), (0.25, 0.25), (0.5, 0.5), (0.9, 0.5)):
        set_training_progress(model, progress)
        assert all(blk.ffn.current_keep() == kept_channels(blk.ffn.d_ff, sparsity) for blk in model.blocks)
    # At progress 0 every channel is on: each layer's output is the dense FFN's.
    set_training_progress(model, 0.0)
    h = torch.randn(2, T, 16, dtype=torch.float64)
    for blk in model.blocks:
        torch.testing.assert_close(blk.ffn(h)[0], FeedForward.forward(blk.ffn, h)[0], rtol=1e-12, atol=1e-12)
    # Eval always uses the target, whatever the progress.
    model.eval()
    assert all(blk.ffn.current_keep() == kept_channels(blk.ffn.d_ff, 0.5) for blk in model.blocks)


def test_conditioned_training_runs_the_hard_mask_forward_and_trains_the_predictor():
    model = _prunable("conditioned")
    x = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        eval_logits = model(x).logits
    model.train()
    train_logits = model(x).logits
    torch.testing.assert_close(train_logits, eval_logits, rtol=1e-12, atol=1e-12)  # same hard masks
    train_logits[:, P - 1 :].square().mean().backward()
    for blk in model.blocks:
        assert blk.ffn.predictor.net[-1].weight.grad.abs().sum() > 0  # straight-through soft top-k gradient


def test_l0_training_samples_gates_and_its_lagrange_multipliers_ascend():
    model = _prunable("static", sparsity=0.75).train()
    x = torch.randint(0, 256, (2, T), generator=torch.Generator().manual_seed(4))
    out = model(x)
    assert float(out.aux_losses["l0_lagrangian"].detach()) == 0.0  # multipliers start at 0
    ffn = model.blocks[0].ffn
    # Dual ascent on gap = expected - target sparsity (0.1 - 0.75 at init): lambda1 goes negative,
    # lambda2 positive, and the Lagrangian then rises with the gap...
    assert ffn.lambdas[0] < 0 < ffn.lambdas[1]
    out = model(x)
    assert float(out.aux_losses["l0_lagrangian"].detach()) > 0
    # ... so minimising it closes every gate a little: descent lowers each gate logit.
    out.aux_losses["l0_lagrangian"].backward()
    assert (ffn.gates.log_alpha.grad > 0).all()
    model.eval()
    assert int(ffn.static_mask().sum()) == kept_channels(ffn.d_ff, 0.75)
    assert ffn.gates.deterministic_mask(0.0).all()  # a static mask at sparsity 0 keeps the dense FFN
    # The gate logits train at their own rate.
    from condcomp.train.optim import build_optimizer

    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    gate_group = [g for g in opt.param_groups if any(p is ffn.gates.log_alpha for p in g["params"])]
    assert gate_group[0]["lr"] == pytest.approx(1e-3 * model.cfg.prunable.gate_lr_scale)
    assert gate_group[0]["weight_decay"] == 0.0


def test_distillation_loss_and_scored_positions():
    from condcomp.train.trainer import IGNORE, distill_loss, lm_loss, scored_from

    gen = torch.Generator().manual_seed(5)
    s, t = torch.randn(2, 7, 11, generator=gen), torch.randn(2, 7, 11, generator=gen)
    y = scored_from(torch.randint(0, 11, (2, 7), generator=gen), 3)
    assert (y[:, :3] == IGNORE).all() and (y[:, 3:] != IGNORE).all()
    pt, ps = t[:, 3:].softmax(-1), s[:, 3:].log_softmax(-1)
    manual = (pt * (pt.log() - ps)).sum(-1).mean()
    torch.testing.assert_close(distill_loss(s, t, y), manual)
    assert float(distill_loss(t, t, y)) == pytest.approx(0.0, abs=1e-6)
    manual_ce = torch.nn.functional.cross_entropy(s[:, 3:].reshape(-1, 11), y[:, 3:].reshape(-1))
    torch.testing.assert_close(lm_loss(s, y), manual_ce)


def test_evaluation_from_a_position_scores_only_later_targets():
    import numpy as np

    from condcomp.data.batches import eval_starts
    from condcomp.train.trainer import LN2, evaluate_split

    model = _prunable("magnitude")
    data = np.random.default_rng(0).integers(0, 256, 200).astype(np.uint8)
    got = evaluate_split(model, data, batch_size=4, max_batches=1, from_position=5)
    starts = eval_starts(len(data), batch_size=4, seq_len=T, max_batches=1)
    windows = torch.from_numpy(np.stack([data[s : s + T + 1] for s in starts]).astype(np.int64))
    with torch.no_grad():
        logits = model(windows[:, :-1]).logits[:, 5:]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), windows[:, 6:].reshape(-1))
    assert got["tokens"] == 4 * (T - 5)
    assert got["bpb"] == pytest.approx(float(nll) / LN2, rel=1e-6)  # the loss is taken in float32


def test_prune_train_from_a_dense_run_starts_at_the_teacher_and_is_exact_on_resume(tiny_config, text_file, tmp_path):
    import json

    from conftest import tiny_overrides

    from condcomp.train import Trainer
    from condcomp.train.pretrained_init import load_run_config

    dense = tiny_config("dense", **{"train.steps": 10})
    Trainer(dense).train()

    def pruned(name, steps):
        return load_run_config(None, tiny_overrides(
            text_file, tmp_path / name, tmp_path / "cache", **{
                "train.steps": steps, "model.init": dense.run_dir, "model.ffn": "prunable",
                "model.prunable.method": "conditioned", "model.prunable.prompt_len": 8, "model.prunable.ramp": 0.5,
                "train.distill": 1.0}))

    trainer = Trainer(pruned("p", 8))
    assert trainer.loss_from == 7
    trainer.train()
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r]
    # Step 1 runs at ramp progress 0: every channel on, the student is its teacher.
    assert steps[0]["distill_kl"] == pytest.approx(0.0, abs=1e-5)
    assert steps[-1]["distill_kl"] > 1e-4 and steps[-1]["layer0.ffn.kept_share"] == 0.5
    # Interrupted at step 4 and resumed: the same losses as the uninterrupted run.
    part = Trainer(pruned("q", 8))
    part.train(until=4)
    resumed = Trainer(pruned("q", 8), resume=True)
    resumed.train()
    again = [json.loads(line) for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in again if "loss" in r] == pytest.approx([r["loss"] for r in steps], rel=1e-6)


def test_prune_cli_bad_input_fails_with_one_line(tmp_path, capsys, tiny_config):
    from condcomp.cli import main
    from condcomp.train import Trainer

    with pytest.raises(SystemExit) as e:
        main(["prune", "train", "--init", "x", "--sparsity", "1.0", "--run-dir", str(tmp_path / "r")])
    assert e.value.code == 2 and "must be in (0, 1)" in capsys.readouterr().err
    cfg = tiny_config("c", **{"model.ffn": "prunable", "model.prunable.prompt_len": 8, "train.steps": 2})
    Trainer(cfg).train()
    assert main(["sample", "--checkpoint", str(cfg.run_dir), "--prompt", "abc", "--length", "4"]) == 2
    err = capsys.readouterr().err
    assert "the prompt has 3 tokens but this model's channel predictors read 8" in err and "Traceback" not in err
    assert main(["prune", "compact", "--checkpoint", str(cfg.run_dir), "--out", str(tmp_path / "k")]) == 2
    assert "give the prompt with --prompt" in capsys.readouterr().err
    assert main(["prune", "compact", "--checkpoint", str(cfg.run_dir), "--out", str(tmp_path / "k"),
                 "--prompt", "alpha beta gamma"]) == 0
    # A compact model loaded into the dense config it came from: the shapes do not match.
    dense_shape = [f"model.d_ff={cfg.model.ffn_hidden}", "model.ffn=swiglu"]
    assert cfg.model.ffn_hidden == 128
    assert main(["train", "--init", str(tmp_path / "k"), "--run-dir", str(tmp_path / "t")]
                + [a for s in dense_shape + [f"data.source={cfg.data.source}"] for a in ("--set", s)]) == 2
    assert "model.d_ff: 128 conflicts with the pretrained model's 64" in capsys.readouterr().err


def test_prune_eval_scores_every_run_per_domain_from_the_prompt_on(tiny_config, text_file, tmp_path, capsys):
    import json
    import random
    from pathlib import Path

    from condcomp.cli import main
    from condcomp.data import load_corpus
    from condcomp.train import Trainer, load_model
    from condcomp.train.trainer import evaluate_split

    other = tmp_path / "other.txt"
    rng = random.Random(1)
    other.write_text("\n".join(" ".join(rng.choice(["one", "two", "three", "four"]) for _ in range(8))
                               for _ in range(4000)) + "\n")
    dense = tiny_config("dense", **{"train.steps": 4})
    cond = tiny_config("cond", **{"train.steps": 4, "model.ffn": "prunable", "model.prunable.prompt_len": 8})
    for cfg in (dense, cond):
        Trainer(cfg).train()
    out = tmp_path / "eval"
    assert main(["prune", "eval", str(dense.run_dir), str(cond.run_dir), "--domains", str(text_file), str(other),
                 "--prompt-len", "8", "--batches", "1", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    by_name = {r["name"]: r for r in results["runs"]}
    model, _ = load_model(dense.run_dir)
    direct = evaluate_split(model, load_corpus(str(other), cache_dir=dense.data.cache_dir).val, batch_size=16,
                            max_batches=1, from_position=7)["bpb"]
    assert by_name["dense"]["bpb"][str(other)] == pytest.approx(direct, rel=1e-9)
    assert by_name["cond"]["method"] == "conditioned" and by_name["dense"]["method"] == "dense"
    overlap = torch.tensor(by_name["cond"]["overlap"])  # [layers, domains, domains]
    assert overlap.shape == (2, 2, 2) and (overlap >= 0).all() and (overlap <= 1).all()
    assert torch.allclose(overlap[:, 0, 1], overlap[:, 1, 0])
    assert (out / "overlap_cond.png").is_file() and "| cond | conditioned | 50% |" in (out / "report.md").read_text()
    # A grid's report counts a pruned variant as the compact model it deploys.
    from condcomp.compare.runner import measure_variant

    pruned, _ = load_model(cond.run_dir)
    measured = measure_variant("cond", Path(cond.run_dir), 0.0, infer_time=0.05)
    predictors = sum(p.numel() for blk in pruned.blocks for p in blk.ffn.predictor.parameters())
    ffn_half = sum(p.numel() for blk in pruned.blocks for p in (blk.ffn.up.weight, blk.ffn.down.weight)) // 2
    assert measured.total_params == pruned.num_parameters()
    assert measured.active_params == pruned.num_parameters() - predictors - ffn_half


def test_generate_continues_from_a_prefilled_cache_and_refuses_a_partial_one():
    from condcomp.config import ModelConfig, from_dict
    from condcomp.layers.kv_cache import ModelCache
    from condcomp.models import Transformer

    torch.manual_seed(0)
    model = Transformer(from_dict(ModelConfig, dict(d_model=16, n_layers=2, n_heads=2, seq_len=32))).double().eval()
    x = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(6))
    cache = ModelCache()
    with torch.no_grad():
        logits = model(x, cache=cache, last_only=True).logits[:, -1]
        assert torch.equal(model.generate(x, 6, temperature=0, prefilled=(cache, logits)),
                           model.generate(x, 6, temperature=0))
        partial = ModelCache()
        model(x[:, :3], cache=partial)
        with pytest.raises(ValueError, match="has read the whole prompt"):
            model.generate(x, 2, prefilled=(partial, logits))


def test_prune_bench_prints_one_row_per_model_and_precision(tiny_config, capsys):
    from condcomp.cli import main
    from condcomp.train import Trainer

    cfg = tiny_config("dense", **{"train.steps": 2})
    Trainer(cfg).train()
    capsys.readouterr()
    assert main(["prune", "bench", "--model", str(cfg.run_dir), "--sparsities", "0.5", "--new-tokens", "8",
                 "--prompt-len", "8", "--prefill-len", "16", "--rounds", "1", "--precisions", "fp32"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "x |" in line]
    assert [r.split("|")[1].strip() for r in rows] == ["dense", "50% pruned"]
    assert rows[1].split("|")[2].strip() == str(cfg.model.ffn_hidden // 2)
    assert main(["prune", "bench", "--model", str(cfg.run_dir), "--new-tokens", "40"]) == 2  # 8 + 40 > seq_len 32


def test_l0_gates_can_start_ranked_by_magnitude():
    from condcomp.layers.traits import calibrate_added_parameters

    model = _prunable("static", gate_init="magnitude")
    uniform = _prunable("static")
    tokens = torch.randint(0, 256, (1, T), generator=torch.Generator().manual_seed(7))
    calibrate_added_parameters(model, tokens)  # what --init runs once the dense weights are loaded
    calibrate_added_parameters(uniform, tokens)
    for blk, plain in zip(model.blocks, uniform.blocks):
        f = blk.ffn
        by_magnitude = hard_channel_mask(magnitude_scores(f.up.weight, f.down.weight, "swiglu"), f.d_ff // 2)
        assert torch.equal(f.static_mask(), by_magnitude)
        assert torch.equal(plain.ffn.gates.log_alpha, torch.full_like(plain.ffn.gates.log_alpha,
                                                                      float(plain.ffn.gates.log_alpha[0].detach())))
