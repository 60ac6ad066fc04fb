"""Sparse upcycling: a dense model's FFNs become MoEs of copies; at step 0 nothing changes."""

from __future__ import annotations

import pytest
import torch

from condcomp.config import ModelConfig
from condcomp.convert import ConvertError
from condcomp.convert.upcycle import upcycle
from condcomp.layers import MoE
from condcomp.models import Transformer


def dense(ffn="swiglu", **kw):
    torch.manual_seed(0)
    cfg = dict(d_model=32, n_layers=4, n_heads=2, seq_len=24, ffn=ffn)
    cfg.update(kw)
    return Transformer(ModelConfig(**cfg)).double()


@pytest.mark.parametrize("ffn", ["swiglu", "gelu"])
@pytest.mark.parametrize("k, every", [(2, 1), (3, 2), (8, 1)])
def test_upcycled_model_computes_exactly_the_dense_model_at_step_0(ffn, k, every):
    base = dense(ffn)
    moe = upcycle(base, num_experts=8, k=k, every=every)
    assert sum(isinstance(b.ffn, MoE) for b in moe.blocks) == 4 // every
    x = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(1))
    for mode in ("eval", "train"):
        getattr(base, mode)(), getattr(moe, mode)()
        with torch.no_grad():
            torch.testing.assert_close(moe(x).logits, base(x).logits, rtol=1e-12, atol=1e-12)


def test_noise_keeps_the_step_0_loss_close_and_makes_experts_differ():
    base = dense().eval()
    x = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(2))
    loss = lambda m: torch.nn.functional.cross_entropy(m(x).logits.reshape(-1, 256), y.reshape(-1))  # noqa: E731
    noisy = upcycle(base, num_experts=4, k=2, noise=0.01).eval()
    experts = noisy.blocks[0].ffn.experts
    assert not torch.equal(experts.up[0], experts.up[1])
    with torch.no_grad():
        assert abs(loss(noisy) - loss(base)) < 1e-3  # multiplicative noise of 1% moves the loss by < 0.001 nats


def test_expert_choice_and_capacity_upcycling_train_a_step():
    for kwargs in ({"router": "expert_choice"}, {"router": "top_k", "capacity_factor": 1.25}):
        moe = upcycle(dense(), num_experts=4, k=2, **kwargs).train()
        out = moe(torch.randint(0, 256, (4, 24)))
        (out.logits.square().mean() + sum(out.aux_losses.values())).backward()
        assert moe.blocks[0].ffn.router.gate.weight.grad is not None


@pytest.mark.parametrize("kwargs, message", [
    ({"num_experts": 4, "k": 5}, "k must be between 1 and num_experts=4"),
    ({"num_experts": 0}, "num_experts must be >= 1"),
    ({"num_experts": 4, "every": 9}, "every must be between 1 and the 4 layers"),
    ({"num_experts": 4, "noise": -1.0}, "noise must be >= 0"),
])
def test_bad_upcycling_arguments_are_named(kwargs, message):
    with pytest.raises(ConvertError, match=message):
        upcycle(dense(), **kwargs)


def test_a_model_that_already_has_experts_is_refused():
    moe = upcycle(dense(), num_experts=4, k=2)
    with pytest.raises(ConvertError, match="needs a dense model .* ffn: moe"):
        upcycle(moe, num_experts=4, k=2)


def test_upcycle_on_the_command_line_then_train_from_it(tiny_config, tmp_path, capsys):
    from condcomp.cli import main
    from condcomp.train import Trainer, load_model

    cfg = tiny_config("seed-run", **{"train.steps": 4, "model.n_layers": 2})
    Trainer(cfg).train()
    out = tmp_path / "upcycled"
    assert main(["upcycle", "--from", cfg.run_dir, "--experts", "4", "--k", "2", "--out", str(out)]) == 0
    assert "2 MoE layers of 4 experts" in capsys.readouterr().out
    dense_model, _ = load_model(cfg.run_dir)
    moe_model, moe_cfg = load_model(out)
    assert moe_cfg.model.ffn == "moe" and moe_cfg.model.moe.num_experts == 4
    x = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(moe_model(x).logits, dense_model(x).logits, rtol=1e-5, atol=1e-5)
    sets = [f"data.source={cfg.data.source}", f"data.cache_dir={cfg.data.cache_dir}", "train.steps=2",
            "train.batch_size=4", "train.eval_every=2", "train.checkpoint_every=2", "train.progress=false"]
    args = ["train", "--init", str(out), "--run-dir", str(tmp_path / "moe-run")] + [a for s in sets for a in ("--set", s)]
    assert main(args) == 0
    assert main(["upcycle", "--from", str(out), "--experts", "4", "--out", str(tmp_path / "again")]) == 2
    assert "needs a dense model" in capsys.readouterr().err


@pytest.mark.parametrize("ffn", ["swiglu", "gelu"])
@pytest.mark.parametrize("granularity, experts, k", [(2, 8, 2), (4, 8, 1), (4, 16, 3)])
def test_fine_grained_upcycling_also_equals_the_dense_model_at_step_0(ffn, granularity, experts, k):
    base = dense(ffn).eval()
    moe = upcycle(base, num_experts=experts, k=k, granularity=granularity).eval()
    layer = moe.blocks[0].ffn
    assert layer.router.k == k * granularity and layer.experts.d_ff == base.cfg.ffn_hidden // granularity
    x = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(moe(x).logits, base(x).logits, rtol=1e-12, atol=1e-12)


def test_granularity_must_divide_the_experts_and_the_hidden_size():
    with pytest.raises(ConvertError, match="granularity must be >= 1 and divide num_experts=6"):
        upcycle(dense(), num_experts=6, k=1, granularity=4)


def test_upcycling_chosen_layers_only():
    base = dense().eval()
    moe = upcycle(base, num_experts=4, k=2, layers=[0, 3]).eval()
    assert [isinstance(b.ffn, MoE) for b in moe.blocks] == [True, False, False, True]
    assert moe.cfg.moe.layers == [0, 3]
    x = torch.randint(0, 256, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(moe(x).logits, base(x).logits, rtol=1e-12, atol=1e-12)
    with pytest.raises(ConvertError, match=r"layers: expected distinct indices in 0\.\.3 .* got \[1, 4\]"):
        upcycle(base, num_experts=4, k=2, layers=[1, 4])


def test_an_upcycled_model_trains_expert_parallel_as_in_one_process(tiny_config, text_file, tmp_path):
    """The upcycled checkpoint as model.init of a 2-rank expert-parallel run == one process on the
    combined batch (dropless top-2, no aux losses: every token's treatment is its own)."""
    from condcomp.train import Trainer

    from conftest import tiny_overrides
    from dist_workers import run_ranks
    from test_distributed import NO_AUX, assert_same_training, train_single, train_worker

    seed = tiny_config("seed", **{"train.steps": 3})
    Trainer(seed).train()
    from condcomp.train import load_model
    from condcomp.train.pretrained_init import save_imported

    dense_model, _ = load_model(seed.run_dir)
    moe = upcycle(dense_model, num_experts=4, k=2)
    save_imported(moe, None, tmp_path / "upcycled", source="test")
    m = moe.cfg.moe
    extra = {"model.ffn": "moe", "model.moe.num_experts": 4, "model.moe.k": 2, "model.moe.capacity_factor": "null",
             "model.moe.activation": m.activation, "model.moe.d_ff": m.d_ff, "model.moe.renormalize": "true",
             "model.init": str(tmp_path / "upcycled"), "train.steps": 4, "train.checkpoint_every": 4, **NO_AUX}
    ranks = run_ranks(train_worker, 2, tmp_path / "spawn",
                      tiny_overrides(text_file, tmp_path / "ep", tmp_path / "cache",
                                     **extra, **{"train.expert_parallel": 2}), None, False)
    single = train_single(tiny_overrides(text_file, tmp_path / "one", tmp_path / "cache", **extra))
    for r in ranks:
        assert_same_training(r, single, tol=2e-5)
