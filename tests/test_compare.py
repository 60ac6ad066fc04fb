"""condcomp compare: budgets, resume, and a report whose numbers come from the runs' own logs."""

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from condcomp.compare import load_grid, run_grid, write_report
from condcomp.config import ConfigError

BUDGET = 2.0e9


def write_grid(tmp: Path, text_file: Path, budget: str = f"{{flops: {BUDGET}}}") -> Path:
    grid = tmp / "grid.yaml"
    grid.write_text(textwrap.dedent(f"""\
        name: tiny
        budget: {budget}
        base:
          model: {{d_model: 32, n_layers: 2, n_heads: 2, seq_len: 32}}
          data: {{source: {text_file}, cache_dir: {tmp / 'cache'}}}
          train: {{batch_size: 4, warmup_steps: 2, eval_every: 10, eval_batches: 2, checkpoint_every: 10,
                   log_every: 1, progress: false, precision: fp32}}
        common: [train.seed=3]
        variants:
          dense: {{}}
          moe: {{set: [model.ffn=moe, model.moe.num_experts=4, model.moe.d_ff=32]}}
        """))
    return grid


@pytest.fixture(scope="module")
def finished_grid(tmp_path_factory):
    """A two-variant grid run twice: interrupted after the first variant, then resumed."""
    tmp = tmp_path_factory.mktemp("grid")
    text = tmp / "corpus.txt"
    import random

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "routing", "expert", "token", "layer"]
    text.write_text("\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(6000)))
    grid = load_grid(write_grid(tmp, text))
    out = tmp / "out"
    first = run_grid(grid, out, stop_after=1, infer_time=0.05, log=lambda *_: None)
    dense_dir = out / "variants" / "dense"
    stamp = {p.name: p.stat().st_mtime_ns for p in dense_dir.rglob("*") if p.is_file()}
    messages = []
    results = run_grid(load_grid(write_grid(tmp, text)), out, infer_time=0.05, log=messages.append)
    md, page = write_report(grid, results, out)
    return {"grid": grid, "out": out, "first": first, "results": results, "stamp": stamp, "messages": messages,
            "md": md, "html": page}


def test_interrupted_grid_resumes_without_retraining(finished_grid):
    assert [r.name for r in finished_grid["first"]] == ["dense"]
    assert [r.name for r in finished_grid["results"]] == ["dense", "moe"]
    dense_dir = finished_grid["out"] / "variants" / "dense"
    now = {p.name: p.stat().st_mtime_ns for p in dense_dir.rglob("*") if p.is_file()}
    assert now == finished_grid["stamp"], "a finished variant was touched on resume"
    assert any("dense: finished earlier, not retrained" in m for m in finished_grid["messages"])


def test_equal_flops_budget_within_five_percent(finished_grid):
    for r in finished_grid["results"]:
        assert abs(r.train_flops - BUDGET) / BUDGET < 0.05, (r.name, r.train_flops)
    # The variants differ in FLOPs per step, so they ran different numbers of steps.
    steps = {r.name: r.steps for r in finished_grid["results"]}
    assert steps["dense"] != steps["moe"]


def test_report_numbers_come_from_the_runs_logs(finished_grid):
    out = finished_grid["out"]
    md = finished_grid["md"].read_text()
    for r in finished_grid["results"]:
        records = [json.loads(l) for l in (out / "variants" / r.name / "metrics.jsonl").read_text().splitlines()]
        last_eval = [x for x in records if "val_bpb" in x][-1]
        assert r.val_bpb == last_eval["val_bpb"]
        assert r.train_flops == last_eval["total_flops"]
        assert r.steps == last_eval["step"]
        assert f"| {r.name} | {last_eval['val_bpb']:.4f} |" in md
        assert f"{last_eval['total_flops']:.3e}" in md
    assert all(finished_grid["grid"].variants[n].train.seed == 3 for n in ("dense", "moe"))
    assert finished_grid["results"][1].active_params < finished_grid["results"][1].total_params  # MoE


def test_every_report_artefact_exists(finished_grid):
    out = finished_grid["out"]
    for name in ("report.md", "report.html", "loss_vs_flops.png", "loss_vs_time.png", "loads_moe.png", "grid.yaml"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    page = finished_grid["html"].read_text()
    assert page.count("data:image/png;base64,") >= 3  # self-contained: plots embedded
    assert 'id="results"' in page and "Where the compute went" in page and "git commit" in page
    assert "torch" in page and "seed" in page


def test_bad_grids_fail_before_training(tmp_path, text_file):
    grid = write_grid(tmp_path, text_file, budget="{tokens: 5}")
    with pytest.raises(ConfigError, match="budget must be"):
        load_grid(grid)
    grid.write_text(grid.read_text().replace("{tokens: 5}", "{flops: 1e9}").replace("model.moe.d_ff=32",
                                                                                    "model.moe.dff=32"))
    with pytest.raises(ConfigError, match=r"variants\.moe: .*model\.moe\.d_ff"):
        load_grid(grid)


def test_a_steps_budget_trains_every_variant_for_the_same_number_of_steps(tmp_path, text_file):
    grid = load_grid(write_grid(tmp_path, text_file, budget="{steps: 7}"))
    assert grid.budget_kind == "steps"
    for cfg in grid.variants.values():
        assert cfg.train.steps == 7 and not cfg.train.max_flops and not cfg.train.max_seconds
    bad = write_grid(tmp_path, text_file, budget="{steps: 7.5}")
    with pytest.raises(ConfigError, match="whole number of steps"):
        load_grid(bad)


def test_time_budget_stops_near_the_budget(tiny_config):
    from condcomp.train import Trainer

    # No warm-up: on a busy machine 1.5 s may hold only a few steps, and the end of the schedule must
    # not depend on how many.
    cfg = tiny_config("timed", **{"train.steps": 100000, "train.max_seconds": 1.5, "train.eval_every": 100000,
                                  "train.warmup_steps": 0})
    trainer = Trainer(cfg)
    trainer.train()
    per_step = trainer.train_seconds / trainer.step
    # The run stops once the next step would end further from the budget than stopping now, so it ends
    # within the last step's duration of the budget (steps vary when the machine is busy: use the real one).
    times = [json.loads(l)["train_seconds"] for l in open(f"{cfg.run_dir}/metrics.jsonl")
             if '"loss"' in l]
    last_step = times[-1] - times[-2]
    assert abs(trainer.train_seconds - 1.5) <= last_step + per_step
    # The LR schedule followed the budget: it ended at the cosine floor.
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(cfg.train.lr * cfg.train.min_lr_ratio, rel=0.15)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.browser
def test_report_renders_in_headless_chromium(finished_grid, tmp_path):
    if CHROMIUM is None:
        if os.environ.get("CONDCOMP_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed; `make setup-browser` installs it (Debian package chromium)")
        pytest.skip("chromium not installed (make setup-browser)")
    page = finished_grid["html"]
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    shot = tmp_path / "shot.png"
    subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,1600", page.as_uri()],
                   check=True, capture_output=True, timeout=120)
    # The screenshot is a real rendering: large, and not one flat colour.
    from PIL import Image

    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 1600)
    colours = img.getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50
    # The rendered DOM has the table rows and decoded plots (naturalWidth > 0 after load).
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace(
        "</body>", "<script>addEventListener('load', () => { document.title = 'imgs:' + "
                   "[...document.images].filter(i => i.naturalWidth > 0).length + ' rows:' + "
                   "document.querySelectorAll('#results tbody tr').length; });</script></body>"))
    dom = subprocess.run(flags + ["--dump-dom", probe.as_uri()], check=True, capture_output=True, text=True,
                         timeout=120).stdout
    assert "<title>imgs:" in dom
    imgs = int(dom.split("<title>imgs:")[1].split()[0])
    rows = int(dom.split(" rows:")[1].split("<")[0])
    assert imgs >= 3 and rows == 2


def test_a_variant_that_fails_names_itself_and_the_grid_stops_cleanly(tmp_path, text_file):
    from condcomp.train import TrainingError

    grid_path = write_grid(tmp_path, text_file)
    # The validation split of the tiny corpus is far shorter than this window: the child refuses to train.
    grid_path.write_text(grid_path.read_text().replace("model.moe.d_ff=32]", "model.moe.d_ff=32, model.seq_len=65536]"))
    grid = load_grid(grid_path)
    with pytest.raises(TrainingError, match="training variant moe failed .exit 2.*run the same compare command"):
        run_grid(grid, tmp_path / "out", infer_time=0.05, log=lambda *_: None)
    assert (tmp_path / "out" / "variants" / "dense" / "result.json").is_file()  # the finished one is kept


def test_every_shipped_grid_loads():
    from importlib import resources

    root = Path(__file__).resolve().parent.parent
    grids = [Path(str(resources.files("condcomp") / "configs" / "grid-demo.yaml"))] + \
        sorted((root / "configs" / "grids").glob("*.yaml"))
    from condcomp.compare.dit_grid import load_dit_grid

    for path in grids:
        if "kind: dit" in path.read_text():
            with pytest.raises(ConfigError, match="is a DiT grid"):
                load_grid(path)
            grid = load_dit_grid(path, "unused")
        else:
            grid = load_grid(path)
        assert grid.variants, path


STAGED_BUDGET = 1.5e9


def test_grid_stages_build_once_and_charge_their_flops(text_file, tmp_path):
    """A seed stage, an upcycled and a BAM stage built from it, variants starting from each and one from
    scratch: every variant ends at the same total FLOPs, the stages' included, and a second run of the
    grid rebuilds nothing."""
    import torch

    from condcomp.train import load_model

    grid_path = tmp_path / "grid.yaml"
    prose = tmp_path / "prose.txt"
    prose.write_text("the quick brown fox jumps over the lazy dog. " * 800)
    grid_path.write_text(textwrap.dedent(f"""\
        name: staged
        budget: {{flops: {STAGED_BUDGET}}}
        base:
          model: {{d_model: 32, n_layers: 2, n_heads: 2, seq_len: 32, ffn: swiglu, attention: causal}}
          data: {{source: {text_file}, cache_dir: {tmp_path / 'cache'}}}
          train: {{batch_size: 4, warmup_steps: 2, eval_every: 10, eval_batches: 2, checkpoint_every: 10,
                   log_every: 1, progress: false, precision: fp32}}
        stages:
          seed: {{train: {{set: [train.steps=6]}}}}
          upcycled: {{upcycle: {{from: seed, experts: 4, k: 2}}}}
          bam-ffn: {{bam: {{from: seed, domains: [{text_file}, {prose}], steps: 3, attention: none}}}}
          bam-attn: {{bam: {{branches_of: bam-ffn, attention: soft}}}}
        variants:
          dense: {{set: [model.init=stage:seed]}}
          upcycled: {{set: [model.init=stage:upcycled]}}
          bam-attn: {{set: [model.init=stage:bam-attn]}}
          bam-top1: {{set: [model.init=stage:bam-ffn, model.moe.k=1]}}
          scratch-moe: {{set: [model.ffn=moe, model.moe.num_experts=4, model.moe.k=2]}}
        """))
    out = tmp_path / "out"
    results = run_grid(load_grid(grid_path), out, infer_time=0.05, log=lambda *_: None)
    charges = json.loads((out / "stages" / "charges.json").read_text())
    assert charges["upcycled"] == charges["seed"] > 0
    assert charges["bam-attn"] == charges["bam-ffn"] > charges["seed"]  # the branches, shared, charged to both
    assert not (out / "stages" / "bam-attn" / "branches").exists()
    by_name = {r.name: r for r in results}
    assert by_name["dense"].prior_flops == charges["seed"] and by_name["scratch-moe"].prior_flops == 0
    assert by_name["bam-attn"].prior_flops == charges["bam-attn"]
    for r in results:
        assert abs(r.train_flops - STAGED_BUDGET) / STAGED_BUDGET < 0.1, r.name
        if r.prior_flops:  # a variant from a stage is evaluated before its first step: the stage's end
            assert r.curve[0]["step"] == 0 and r.curve[0]["total_flops"] == r.prior_flops
    assert by_name["upcycled"].curve[0]["val_bpb"] == pytest.approx(by_name["dense"].curve[0]["val_bpb"], rel=1e-4)
    _, top1 = load_model(out / "variants" / "bam-top1")  # the variant's own setting wins over the stage's
    assert top1.model.ffn == "moe" and top1.model.moe.k == 1 and top1.model.moe.num_experts == 3
    _, cfg = load_model(out / "variants" / "bam-attn")
    assert cfg.model.attention == "experts" and cfg.model.moe.num_experts == 3
    assert cfg.train.max_flops == pytest.approx(STAGED_BUDGET - charges["bam-attn"])
    # The upcycled stage computes what the seed does.
    seed, _ = load_model(out / "stages" / "seed")
    upcycled, _ = load_model(out / "stages" / "upcycled")
    x = torch.randint(0, 256, (2, 32))
    torch.testing.assert_close(upcycled(x).logits, seed(x).logits, rtol=1e-5, atol=1e-5)
    messages = []
    run_grid(load_grid(grid_path), out, infer_time=0.05, log=messages.append)
    assert sum("built earlier" in m for m in messages) == 4 and sum("not retrained" in m for m in messages) == 5


@pytest.mark.parametrize("stages, message", [
    ("{up: {upcycle: {from: nowhere, experts: 4}}}", "stages.up.upcycle.from: must name an earlier stage"),
    ("{s: {train: {}}, b: {bam: {from: s, steps: 2}}}", "stages.b.bam: domains .* and steps are required"),
    ("{s: {train: {}}, b: {bam: {from: s, domains: [stdlib], steps: 2}}, c: {bam: {branches_of: b, steps: 3}}}",
     r"stages.c.bam: \['steps'\] come from branches_of: b"),
    ("{s: {fly: {}}}", "stages.s: expected exactly one of train"),
])
def test_bad_stages_fail_at_load(stages, message, text_file, tmp_path):
    path = write_grid(tmp_path, text_file)
    path.write_text(path.read_text() + f"stages: {stages}\n")
    with pytest.raises(ConfigError, match=message):
        load_grid(path)


def test_a_variant_naming_a_missing_stage_fails_at_load(text_file, tmp_path):
    path = write_grid(tmp_path, text_file)
    path.write_text(path.read_text().replace("dense: {}", "dense: {set: [model.init=stage:seed]}"))
    with pytest.raises(ConfigError, match="variants.dense: model.init: stage:seed names no stage"):
        load_grid(path)
