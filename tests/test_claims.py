"""Honest science in condcomp compare: paper claims checked from the results (each verdict on hand-made
results), views (one run per budget kind), the base model's activation inherited by a technique's
FFN, the per-variant changes, routing health and the quality-vs-cost front; and a real grid whose
report shows all of them (rendered in headless Chromium)."""

from __future__ import annotations

import math
import shutil
import subprocess
import textwrap

import pytest

from condcomp import registry
from condcomp.compare import load_grid, run_grid, write_report
from condcomp.compare.claims import evaluate_claims, steps_to_reach
from condcomp.compare.report import pareto_front, table_head, table_rows
from condcomp.compare.routing_health import routing_health, summarize_health
from condcomp.compare.runner import VariantResult
from condcomp.config import ConfigError


def result(name, bpb, seed=None, *, view=None, curve=None, steps=100, **extra):
    curve = curve or [{"step": steps, "val_bpb": bpb, "total_flops": 1e9, "train_seconds": 1.0}]
    return VariantResult(name=name, val_bpb=bpb, total_params=10, active_params=10, train_flops=1e9,
                         train_seconds=1.0, steps=steps, train_tokens_per_s=1.0, infer_tokens_per_s=1.0,
                         peak_rss_mib=1.0, seed=seed, view=view, curve=curve, **extra)


class FakeGrid:
    """What evaluate_claims reads of a grid."""

    def __init__(self, claims, budget_kind="steps"):
        self.claims = claims
        self.budget_kind = budget_kind


# -- claims --------------------------------------------------------------------------------------------

LOWER = [{"claim": "moe.beats_dense_per_step", "variant": "moe", "baseline": "dense"}]


@pytest.mark.parametrize("moe, dense, expected", [
    ([1.50, 1.52, 1.49], [1.70, 1.71, 1.69], "held"),
    ([1.80, 1.81, 1.79], [1.70, 1.71, 1.69], "did not hold"),
    ([1.70, 1.60, 1.80], [1.71, 1.69, 1.70], "within noise"),
    ([1.60], [1.70], "held (one seed)"),
    ([1.80], [1.70], "did not hold (one seed)"),
])
def test_a_lower_loss_claim_evaluates_to_each_verdict(moe, dense, expected):
    seeds = [None] if len(moe) == 1 else list(range(len(moe)))
    results = [result("dense", b, s) for b, s in zip(dense, seeds)] + [result("moe", b, s) for b, s in zip(moe, seeds)]
    row = evaluate_claims(FakeGrid(LOWER), results)[0]
    assert row.verdict == expected
    assert row.statement == "moe ends below dense at equal steps and equal active compute"
    assert "Fedus" in row.paper and "bits/byte" in row.measured


def curve(points):
    return [{"step": s, "val_bpb": v, "total_flops": 0.0, "train_seconds": 0.0} for s, v in points]


def test_steps_to_reach_interpolates_between_evaluations():
    c = curve([(100, 3.0), (200, 2.0), (300, 1.5)])
    assert steps_to_reach(c, 2.0) == 200
    assert steps_to_reach(c, 1.75) == pytest.approx(250)
    assert steps_to_reach(c, 3.5) == 100
    assert steps_to_reach(c, 1.0) is None


STEPS = [{"claim": "moe.expert_choice_steps", "variant": "ec", "baseline": "top2"}]


@pytest.mark.parametrize("reach_at, expected", [
    ([200, 210, 190], "held"),           # 0.40x, 0.42x, 0.38x of top-2's 500 steps
    ([400, 420, 380], "did not hold"),   # 0.8x
    ([150, 350, 250], "within noise"),   # 0.5x on average, wide interval
    ([200], "held (one seed)"),
    ([None, 200, 200], "did not hold"),  # one seed never got there
])
def test_a_steps_to_loss_claim_evaluates_to_each_verdict(reach_at, expected):
    results = []
    for seed, at in enumerate(reach_at):
        seed = None if len(reach_at) == 1 else seed
        results.append(result("top2", 2.0, seed, curve=curve([(250, 2.5), (500, 2.0)]), steps=500))
        # ec's curve crosses top-2's final 2.0 exactly at step `at` (or stays above it).
        ec = curve([(at, 2.0), (500, 1.8)]) if at is not None else curve([(250, 2.6), (500, 2.2)])
        results.append(result("ec", ec[-1]["val_bpb"], seed, curve=ec, steps=500))
    row = evaluate_claims(FakeGrid(STEPS), results)[0]
    assert row.verdict == expected, row.measured
    assert "0.5x" in row.measured or "did not reach" in row.measured


def test_claims_only_read_their_own_view():
    results = [result("dense", 1.7, view="steps"), result("moe", 1.6, view="steps"),
               result("dense", 1.5, view="flops"), result("moe", 1.9, view="flops")]
    assert evaluate_claims(FakeGrid(LOWER), results)[0].verdict == "held (one seed)"
    mod = [{"claim": "mod.equal_flops", "variant": "moe", "baseline": "dense"}]
    assert evaluate_claims(FakeGrid(mod), results)[0].verdict == "did not hold (one seed)"


def test_every_registered_claim_cites_its_paper_and_can_be_bound():
    claims = registry.claims()
    assert {"moe.expert_choice_steps", "moe.beats_dense_per_step", "moe.upcycled_beats_dense", "mod.equal_flops",
            "colt5.equal_flops"} <= set(claims)
    for claim in claims.values():
        assert "20" in claim.paper and "{variant}" in claim.statement and "{baseline}" in claim.statement


# -- grids: views, claims, inheritance -------------------------------------------------------------------

def write(tmp_path, text_file, body: str, budget="{flops: 4.0e8, steps: 6}"):
    path = tmp_path / "grid.yaml"
    path.write_text(textwrap.dedent(f"""\
        name: claims
        budget: {budget}
        base:
          model: {{d_model: 32, n_layers: 2, n_heads: 2, seq_len: 32, ffn: gelu}}
          data: {{source: {text_file}, cache_dir: {tmp_path / 'cache'}}}
          train: {{batch_size: 4, warmup_steps: 2, eval_every: 3, eval_batches: 2, checkpoint_every: 10,
                   log_every: 1, progress: false, precision: fp32}}
        """) + textwrap.dedent(body))
    return path


VARIANTS = """\
    variants:
      dense: {}
      moe: {set: [model.ffn=moe, model.moe.num_experts=4, model.moe.k=2, model.moe.d_ff=64]}
      moe-swiglu: {set: [model.ffn=moe, model.moe.activation=swiglu]}
    """


def test_a_technique_ffn_inherits_the_base_activation_unless_set(tmp_path, text_file):
    grid = load_grid(write(tmp_path, text_file, VARIANTS))
    assert grid.variants["moe"].model.moe.activation == "gelu"  # from the base's ffn: gelu
    assert grid.inherited == {"moe": ["model.moe.activation=gelu"]}
    assert grid.variants["moe-swiglu"].model.moe.activation == "swiglu"  # the variant's own choice
    changes = grid.changes("moe")
    assert "model.ffn: 'gelu' -> 'moe'" in changes and "model.moe.k: 1 -> 2" in changes
    # Resolved, not as written: the base's own moe section has the default activation.
    assert "model.moe.activation: 'swiglu' -> 'gelu'" in changes
    assert grid.changes("dense") == []


def test_views_and_claims_are_checked_at_load(tmp_path, text_file):
    grid = load_grid(write(tmp_path, text_file, VARIANTS))
    assert grid.views == ["flops", "steps"] and grid.budget_kind == "flops"
    steps = grid.for_view("steps")
    assert steps.variants["moe"].train.steps == 6 and steps.variants["moe"].train.max_flops is None
    assert grid.variants["moe"].train.max_flops == 4.0e8
    bad = [("[{claim: moe.nope, variant: moe, baseline: dense}]", "unknown claim 'moe.nope'"),
           ("[{claim: mod.equal_flops, variant: mod, baseline: dense}]", "'mod' is not a variant"),
           ("[{claim: moe.beats_dense_per_step}]", "must be {claim: ID, variant: NAME, baseline: NAME}")]
    for claims, message in bad:
        with pytest.raises(ConfigError, match=message):
            load_grid(write(tmp_path, text_file, VARIANTS + f"claims: {claims}\n"))
    with pytest.raises(ConfigError, match="compares at equal steps, but the grid's budget has flops; add steps: N"):
        load_grid(write(tmp_path, text_file, VARIANTS + "claims: [{claim: moe.beats_dense_per_step, variant: moe, "
                                                        "baseline: dense}]\n", budget="{flops: 4.0e8}"))


# -- routing health and the front ------------------------------------------------------------------------

def test_routing_health_counts_dead_experts_drops_and_entropy():
    records = [{"step": s, "layer1.ffn.tokens_per_expert": [90, 10, 0, 0], "layer1.ffn.fraction_dropped": 0.5,
                "layer1.ffn.router_entropy": math.log(4) / 2} for s in range(1, 9)]
    records[0]["layer1.ffn.tokens_per_expert"] = [25, 25, 25, 25]  # early on, balanced
    health = routing_health(records)
    assert list(health) == ["layer1.ffn"] and health["layer1.ffn"]["share"][-1] == [0.9, 0.1, 0.0, 0.0]
    summary = summarize_health(health["layer1.ffn"])
    assert summary == {"dead_experts": 2, "dropped": 0.5, "entropy_ratio": pytest.approx(0.5)}


def test_the_pareto_front_keeps_what_nothing_beats_on_both_axes():
    # (speed, bits/byte): fast+good, slow+best, slow+bad (beaten by the first two)
    points = [(100.0, 1.6), (50.0, 1.5), (40.0, 1.7)]
    assert pareto_front(points, higher_x_better=True) == [0, 1]
    assert pareto_front([(10.0, 1.6), (20.0, 1.5), (30.0, 1.55)], higher_x_better=False) == [0, 1]


# -- a real grid ---------------------------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def test_a_grid_with_two_views_and_a_claim_reports_them(tmp_path, text_file):
    body = """\
    variants:
      dense: {}
      moe: {set: [model.ffn=moe, model.moe.num_experts=4, model.moe.k=2, model.moe.d_ff=64]}
    claims:
      - {claim: moe.beats_dense_per_step, variant: moe, baseline: dense}
      - {claim: mod.equal_flops, variant: moe, baseline: dense}
    """
    grid = load_grid(write(tmp_path, text_file, body))
    out = tmp_path / "out"
    results = run_grid(grid, out, infer_time=0.02, log=lambda *_: None)
    assert [(r.name, r.view) for r in results] == [("dense", "flops"), ("moe", "flops"), ("dense", "steps"),
                                                   ("moe", "steps")]
    assert (out / "steps" / "variants" / "moe" / "result.json").is_file()
    assert [r.steps for r in results if r.view == "steps"] == [6, 6]
    head = table_head(results)
    assert head[:5] == ["variant", "equal FLOPs: bits/byte", "equal FLOPs: steps", "equal steps: bits/byte",
                        "equal steps: steps"]
    assert table_rows(results)[1][4] == "6"
    assert results[1].routing and set(results[1].routing) == {"layer0.ffn", "layer1.ffn"}
    # Resuming reads the finished runs back, views included.
    again = run_grid(grid, out, infer_time=0.02, log=lambda *_: None)
    assert [(r.name, r.view, r.val_bpb) for r in again] == [(r.name, r.view, r.val_bpb) for r in results]

    md, page = write_report(grid, results, out)
    text = md.read_text()
    assert "## The papers' claims, checked" in text
    rows = evaluate_claims(grid, results)
    for row in rows:
        assert f"| {row.statement} (equal {row.view}) |" in text and row.verdict.endswith("(one seed)")
    assert "## Routing health" in text and "| moe | layer0.ffn |" in text
    assert "- **moe**: model.ffn: 'gelu' -> 'moe'" in text and "(inherited from the base: model.moe.activation=gelu)" in text
    for png in ("pareto.png", "loss_equal_flops.png", "loss_equal_steps.png", "routing_moe.png"):
        assert (out / png).is_file()
    if CHROMIUM is None:
        return
    probe = tmp_path / "probe.html"
    probe.write_text(page.read_text().replace(
        "</body>", "<script>addEventListener('load', () => { document.title = 'claims:' + "
                   "document.querySelectorAll('#claims tbody tr').length + ' imgs:' + "
                   "[...document.images].filter(i => i.naturalWidth > 0).length; });</script></body>"))
    dom = subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", probe.as_uri()],
                         check=True, capture_output=True, text=True, timeout=120).stdout
    assert "<title>claims:2 imgs:" in dom
    assert int(dom.split(" imgs:")[1].split("<")[0]) >= 5  # two views' curves, the front, routing, loads
