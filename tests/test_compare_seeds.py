"""condcomp compare over seeds: the interval arithmetic, the verdicts, and a grid run per seed whose
report gives means, intervals and noise-aware comparisons."""

from __future__ import annotations

import math
import textwrap

import pytest

from condcomp.compare import load_grid, run_grid, write_report
from condcomp.compare.report import summarize, table_rows
from condcomp.compare.runner import VariantResult
from condcomp.compare.stats import estimate, t975, verdict
from condcomp.config import ConfigError


def test_estimate_is_the_t_interval_of_the_mean():
    est = estimate([1.0, 2.0, 3.0])
    assert est.mean == 2.0 and est.sd == 1.0 and est.n == 3
    assert est.half_width == pytest.approx(4.303 / math.sqrt(3))
    one = estimate([1.5])
    assert one.mean == 1.5 and math.isnan(one.sd) and math.isnan(one.half_width)
    assert t975(2.7) == t975(2) and t975(35) == t975(30) and t975(5000) == 1.960


@pytest.mark.parametrize("candidate, baseline, expected", [
    ([1.50, 1.51, 1.49], [1.70, 1.71, 1.69], "better"),
    ([1.90, 1.91, 1.89], [1.70, 1.71, 1.69], "worse"),
    ([1.70, 1.75, 1.65], [1.71, 1.66, 1.74], "within noise"),
    ([1.5], [1.7, 1.71], "one seed"),
])
def test_verdicts_on_hand_made_results(candidate, baseline, expected):
    d = verdict(candidate, baseline)
    assert d.verdict == expected
    assert d.delta == pytest.approx(sum(candidate) / len(candidate) - sum(baseline) / len(baseline))


def test_paired_verdict_uses_the_differences():
    """Two replicates where the candidate is worse by ~0.1 in both: Welch cannot tell (the replicates
    differ more than that), the paired interval can."""
    cand, base = [1.9441, 1.9502], [1.8304, 1.8502]
    assert verdict(cand, base).verdict == "within noise"
    d = verdict(cand, base, paired=True)
    diffs = [0.1137, 0.1000]
    assert d.delta == pytest.approx(sum(diffs) / 2) and d.verdict == "worse"
    assert d.half_width == pytest.approx(12.706 * estimate(diffs).sd / math.sqrt(2))
    with pytest.raises(ValueError, match="equal counts"):
        verdict([1.0, 2.0], [1.0], paired=True)


def test_welch_interval_matches_the_formula():
    a, b = [1.0, 1.2, 1.1, 1.3], [1.5, 1.4]
    d = verdict(a, b)
    va, vb = estimate(a).sd ** 2 / 4, estimate(b).sd ** 2 / 2
    df = (va + vb) ** 2 / (va ** 2 / 3 + vb ** 2 / 1)
    assert d.half_width == pytest.approx(t975(df) * math.sqrt(va + vb))


def result(name, bpb, seed):
    return VariantResult(name=name, val_bpb=bpb, total_params=10, active_params=10, train_flops=1e9,
                         train_seconds=1.0, steps=10, train_tokens_per_s=1.0, infer_tokens_per_s=1.0,
                         peak_rss_mib=1.0, seed=seed)


def test_the_table_aggregates_seeds_and_compares_with_the_first_variant():
    results = [result("dense", 1.70, 0), result("moe", 1.50, 0), result("dense", 1.71, 1), result("moe", 1.52, 1),
               result("dense", 1.69, 2), result("moe", 1.49, 2)]
    assert [s.name for s in summarize(results)] == ["dense", "moe"]
    rows = table_rows(results)
    assert rows[0][:5] == ["dense", "3", "1.7000 ± 0.0100", "±0.0248", "(baseline)"]
    assert rows[1][4].endswith(": better") and rows[1][4].startswith("-0.1967")  # paired by seed
    # Without seeds the table is the plain one, a row per run.
    assert table_rows([result("dense", 1.7, None)])[0][:2] == ["dense", "1.7000"]


def test_bad_seeds_fail_at_load(tmp_path, text_file):
    from test_compare import write_grid

    path = write_grid(tmp_path, text_file)
    for bad in ("[]", "[0, 0]", "[-1]", "3", "[0.5]"):
        path.write_text(path.read_text().split("seeds:")[0] + f"seeds: {bad}\n")
        with pytest.raises(ConfigError, match="seeds must be a list of distinct integers"):
            load_grid(path)


def test_a_grid_with_seeds_runs_each_seed_and_reports_intervals(tmp_path, text_file):
    grid_path = tmp_path / "grid.yaml"
    grid_path.write_text(textwrap.dedent(f"""\
        name: seeded
        budget: {{flops: 4.0e8}}
        seeds: [0, 1]
        base:
          model: {{d_model: 32, n_layers: 2, n_heads: 2, seq_len: 32}}
          data: {{source: {text_file}, cache_dir: {tmp_path / 'cache'}}}
          train: {{batch_size: 4, warmup_steps: 2, eval_every: 4, eval_batches: 2, checkpoint_every: 10,
                   log_every: 1, progress: false, precision: fp32}}
        variants:
          dense: {{}}
          gelu: {{set: [model.ffn=gelu]}}
        """))
    out = tmp_path / "out"
    results = run_grid(load_grid(grid_path), out, infer_time=0.02, log=lambda *_: None)
    assert [(r.name, r.seed) for r in results] == [("dense", 0), ("gelu", 0), ("dense", 1), ("gelu", 1)]
    assert (out / "seed-1" / "variants" / "gelu" / "result.json").is_file()
    assert results[0].val_bpb != results[2].val_bpb  # the seeds really differ
    md, page = write_report(load_grid(grid_path), results, out)
    text = md.read_text()
    assert "val bits/byte (mean ± sd)" in text and "vs dense (paired 95%)" in text and "Seed(s): [0, 1]" in text
    assert "95% CI" in page.read_text()


def test_with_seed_reaches_stages_and_staged_variants(tmp_path, text_file):
    from condcomp.compare.runner import with_seed

    grid_path = tmp_path / "grid.yaml"
    grid_path.write_text(textwrap.dedent(f"""\
        name: staged-seeds
        budget: {{flops: 1.0e9}}
        seeds: [3, 4]
        base:
          model: {{d_model: 32, n_layers: 2, n_heads: 2, seq_len: 32}}
          data: {{source: {text_file}, cache_dir: {tmp_path / 'cache'}}}
        stages:
          seed: {{train: {{set: [train.steps=2]}}}}
        variants:
          dense: {{set: [model.init=stage:seed]}}
          scratch: {{}}
        """))
    grid = load_grid(grid_path)
    g = with_seed(grid, 4)
    assert g.stages["seed"].config.train.seed == 4 and g.variants["scratch"].train.seed == 4
    assert g.staged["dense"]["config"]["train"]["seed"] == 4
    assert grid.stages["seed"].config.train.seed != 4  # the loaded grid is left as it was
