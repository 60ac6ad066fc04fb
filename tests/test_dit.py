"""The diffusion transformer (condcomp.models.DiT) and EC-DiT: expert choice per image is
batch-invariant, a DiT whose experts are all the same equals the dense DiT, the sampler is a
function of its seed, the judge's Fréchet distance against its closed form, train -> resume ->
sample end to end, and bad input."""

from __future__ import annotations

import json

import pytest
import torch

from condcomp.cli import main
from condcomp.models.digit_judge import frechet_distance
from condcomp.dit_config import DiTConfig
from condcomp.models.dit import DiT
from condcomp.models.flow import sample
from condcomp.routing import ExpertChoiceRouter
from condcomp.settings import ConfigError, from_dict

TINY = {"image_size": 8, "patch": 2, "d_model": 32, "n_layers": 2, "n_heads": 2}


def _tiny(**kw) -> DiTConfig:
    return from_dict(DiTConfig, {**TINY, **kw})


def test_expert_choice_per_sequence_is_batch_invariant_and_fills_each_expert_per_image():
    torch.manual_seed(0)
    router = ExpertChoiceRouter(d_model=16, num_experts=4, capacity_factor=2.0, mode="per_sequence")
    x = torch.randn(3, 10, 16)
    whole = router(x)
    assert whole.group_sizes.tolist() == [3 * 5] * 4  # c = ceil(2 * 10 / 4) = 5 per expert and image
    for i in range(3):
        alone = router(x[i : i + 1])
        mine = (whole.token_index >= 10 * i) & (whole.token_index < 10 * (i + 1))
        assert sorted((whole.token_index[mine] - 10 * i).tolist()) == sorted(alone.token_index.tolist())
    assert router.causal is False


@pytest.mark.parametrize("router", ["expert_choice", "top_k"])
def test_moe_dit_is_batch_invariant(router):
    torch.manual_seed(0)
    moe = {"num_experts": 4, "router": router, "k": 2, "capacity_factor": 2.0, "expert_choice_mode": "per_sequence"}
    model = DiT(_tiny(ffn="moe", moe=moe)).double().eval()
    for p in model.parameters():  # leave adaLN-Zero's zero init, so the FFN matters
        torch.nn.init.normal_(p, std=0.2)
    x, t, y = torch.randn(4, 1, 8, 8, dtype=torch.float64), torch.rand(4, dtype=torch.float64), torch.tensor([0, 3, 10, 7])
    batch = model(x, t, y)[0]
    one_by_one = torch.cat([model(x[i : i + 1], t[i : i + 1], y[i : i + 1])[0] for i in range(4)])
    if router == "top_k":  # token choice with a capacity depends on the batch through the overflow order
        moe["capacity_factor"] = None
        model2 = DiT(_tiny(ffn="moe", moe=moe)).double().eval()
        model2.load_state_dict(model.state_dict())
        batch = model2(x, t, y)[0]
        one_by_one = torch.cat([model2(x[i : i + 1], t[i : i + 1], y[i : i + 1])[0] for i in range(4)])
    torch.testing.assert_close(batch, one_by_one)


@pytest.mark.parametrize("moe", [
    {"num_experts": 3, "router": "expert_choice", "capacity_factor": 3.0, "expert_choice_mode": "per_sequence"},
    {"num_experts": 3, "router": "top_k", "k": 3, "capacity_factor": None, "renormalize": True},
])
def test_a_dit_whose_experts_are_all_the_dense_ffn_equals_the_dense_dit(moe):
    """Every expert serving every patch with gates summing to 1 (EC at capacity E; top-E) is the dense FFN."""
    torch.manual_seed(0)
    dense = DiT(_tiny(ffn="gelu")).double()
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.2)
    sparse = DiT(_tiny(ffn="moe", moe=moe)).double()
    state = sparse.state_dict()
    for key, value in dense.state_dict().items():
        if ".ffn." in key:
            prefix, which = key.rsplit(".ffn.", 1)
            name = which.split(".")[0]  # up / down
            state[f"{prefix}.ffn.experts.{name}"] = value.t().expand_as(state[f"{prefix}.ffn.experts.{name}"]).clone()
        else:
            state[key] = value
    sparse.load_state_dict(state)
    x, t, y = torch.randn(3, 1, 8, 8, dtype=torch.float64), torch.rand(3, dtype=torch.float64), torch.tensor([1, 2, 10])
    torch.testing.assert_close(sparse(x, t, y)[0], dense(x, t, y)[0])


def test_patchify_round_trips_and_the_dit_starts_at_zero_velocity():
    model = DiT(_tiny())
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(model.unpatchify(model.patchify(x)), x)
    assert model.patchify(x).shape == (2, 16, 4)
    assert torch.equal(model(x, torch.rand(2), torch.tensor([0, 1]))[0], torch.zeros_like(x))  # adaLN-Zero


def test_sampler_is_a_function_of_its_seed_and_guidance_mixes_the_two_velocities():
    torch.manual_seed(0)
    model = DiT(_tiny()).eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    labels = torch.tensor([1, 5])
    a = sample(model, labels, steps=3, guidance=2.0, generator=torch.Generator().manual_seed(4))
    b = sample(model, labels, steps=3, guidance=2.0, generator=torch.Generator().manual_seed(4))
    c = sample(model, labels, steps=3, guidance=2.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    # One Euler step from known noise: x0 = x1 - (v_u + w (v_c - v_u)).
    noise = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        v_c = model(noise, torch.ones(2), labels)[0]
        v_u = model(noise, torch.ones(2), torch.full_like(labels, 10))[0]
    one = sample(model, labels, steps=1, guidance=3.0, noise=noise.clone())
    torch.testing.assert_close(one, noise - (v_u + 3.0 * (v_c - v_u)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="guidance scale must be >= 0"):
        sample(model, labels, steps=2, guidance=-1.0)


def test_frechet_distance_matches_the_closed_form_for_diagonal_gaussians():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 3, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    b = torch.randn(20000, 3, generator=gen, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.5], dtype=torch.float64) + 1.0
    mu_a, mu_b, sd_a, sd_b = a.mean(0), b.mean(0), a.std(0), b.std(0)
    closed = float(((mu_a - mu_b) ** 2).sum() + ((sd_a - sd_b) ** 2).sum())  # diagonal: no cross terms
    assert frechet_distance(a, b) == pytest.approx(closed, rel=0.02)
    assert abs(frechet_distance(a, a)) < 1e-6


def test_bad_configs_fail_at_construction_naming_the_key():
    with pytest.raises(ConfigError, match="patch: 3 does not divide image_size 8"):
        _tiny(patch=3)
    with pytest.raises(ConfigError, match="n_heads: 3 does not divide d_model 32"):
        _tiny(n_heads=3)
    model = DiT(_tiny())
    with pytest.raises(ValueError, match="class labels must be in 0..9"):
        model(torch.randn(1, 1, 8, 8), torch.rand(1), torch.tensor([11]))


DIT_SETS = ["data.dataset=mnist8", "model.d_model=32", "model.n_layers=2", "model.n_heads=2", "train.batch_size=8",
            "train.eval_every=4", "train.eval_samples=10", "train.sample_steps=2", "train.log_every=2",
            "train.checkpoint_every=2", "train.progress=false", "train.precision=fp32", "model.ffn=moe",
            "model.moe.num_experts=4", "model.moe.d_ff=64"]


@pytest.mark.slow
def test_train_resume_sample_end_to_end(tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file

    import functools

    from condcomp.models import digit_judge

    monkeypatch.setenv("CONDCOMP_CACHE", str(tmp_path / "cache"))
    # The judge is trained once and cached; here a one-epoch judge keeps the test short.
    monkeypatch.setattr(digit_judge, "train_judge", functools.partial(digit_judge.train_judge, epochs=1))
    sets = [a for s in DIT_SETS for a in ("--set", s)]
    whole, part = tmp_path / "whole", tmp_path / "part"
    assert main(["dit", "train", "--run-dir", str(whole), "--set", "train.steps=4"] + sets) == 0
    # The same run stopped after 2 steps and resumed gives the same weights.
    assert main(["dit", "train", "--run-dir", str(part), "--set", "train.steps=2"] + sets) == 0
    config = json.loads((part / "config.json").read_text())
    config["train"]["steps"] = 4
    (part / "config.json").write_text(json.dumps(config))
    assert main(["dit", "train", "--run-dir", str(part), "--resume"]) == 0
    a = load_file(str(whole / "checkpoints" / "step_00000004" / "model.safetensors"))
    b = load_file(str(part / "checkpoints" / "step_00000004" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4] and "frechet" in records[-1] and "sample_accuracy" in records[-1]

    out = tmp_path / "grid.png"
    assert main(["dit", "sample", "--checkpoint", str(whole), "--classes", "0-9", "--per-class", "3",
                 "--steps", "2", "--out", str(out)]) == 0
    import matplotlib.image

    assert matplotlib.image.imread(out).shape[:2] == (10 * 10, 3 * 10)  # 8x8 digits with 2-px gutters
    capsys.readouterr()
    assert main(["dit", "eval", "--checkpoint", str(whole), "--samples", "20", "--steps", "2"]) == 0
    assert "judge accuracy" in capsys.readouterr().out
    assert main(["dit", "sample", "--checkpoint", str(whole), "--classes", "12", "--out", str(out)]) == 2
    assert "unknown class label 12" in capsys.readouterr().err


def test_an_lm_checkpoint_is_refused_by_dit_sample(tmp_path, capsys, tiny_config):
    from condcomp.train import Trainer

    cfg = tiny_config()
    Trainer(cfg).train()
    assert main(["dit", "sample", "--checkpoint", cfg.run_dir, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "is not a DiT checkpoint" in err and "Traceback" not in err


@pytest.mark.slow
def test_a_tiny_grid_trains_every_variant_at_equal_flops_and_writes_the_report(tmp_path, monkeypatch):
    import functools

    from condcomp.models import digit_judge

    monkeypatch.setenv("CONDCOMP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(digit_judge, "train_judge", functools.partial(digit_judge.train_judge, epochs=1))
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "kind: dit\nname: tiny\nbudget: {flops: 1.5e9}\n"
        "base: {data: {dataset: mnist8}, model: {d_model: 32, n_layers: 2, n_heads: 2, moe: {num_experts: 4, d_ff: 64}},\n"
        "       train: {batch_size: 8, steps: 1000, eval_every: 3, eval_samples: 10, sample_steps: 2, log_every: 1,\n"
        "               checkpoint_every: 3, progress: false, precision: fp32}}\n"
        "variants:\n  dense: {}\n  ec: {set: [model.ffn=moe]}\n")
    out = tmp_path / "out"
    assert main(["dit", "compare", "--grid", str(grid), "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())
    assert set(rows) == {"dense", "ec"} and rows["ec"]["ffn"] == "expert choice"
    for row in rows.values():  # both stopped within half a step of the shared budget
        assert abs(row["flops"] - 1.5e9) <= 0.5 * row["flops"] / row["steps"] + 1
    for name in ("samples.png", "loss_vs_flops.png", "frechet_vs_flops.png", "routing_ec.png", "report.html"):
        assert (out / name).is_file(), name
    assert "## The claim" in (out / "report.md").read_text()
    _renders_in_chromium(out / "report.html", tmp_path, images=4, rows=2)
    # A second run trains nothing more (every variant already reached the budget).
    before = (out / "ec" / "metrics.jsonl").read_text()
    assert main(["dit", "compare", "--grid", str(grid), "--out", str(out)]) == 0
    assert (out / "ec" / "metrics.jsonl").read_text() == before


def _renders_in_chromium(page, tmp_path, *, images: int, rows: int) -> None:
    """The report's images decode and its table has ``rows`` rows in headless Chromium (as the LM report test)."""
    import os
    import shutil
    import subprocess

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("CONDCOMP_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed; `make setup-browser` installs it (Debian package chromium)")
        return
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace(
        "</body>", "<script>addEventListener('load', () => { document.title = 'imgs:' + "
                   "[...document.images].filter(i => i.naturalWidth > 0).length + ' rows:' + "
                   "document.querySelectorAll('#results tbody tr').length; });</script></body>"))
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run(flags + ["--dump-dom", probe.as_uri()], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    assert f"<title>imgs:{images} rows:{rows}<" in dom
