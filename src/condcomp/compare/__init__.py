"""``condcomp compare``: grids of variants trained under equal compute, measured, and reported.

    grid = load_grid("configs/grids/full.yaml")
    results = run_grid(grid, "runs/compare-full")          # resumable; one child process per variant
    md, html = write_report(grid, results, "runs/compare-full")

grid.py reads grids; runner.py trains and measures variants; report.py writes the table, plots and
pages; claims.py checks the papers' claims on the results; stats.py holds the seed statistics;
routing_health.py reads routing over training; compute_map.py traces where each router sent the compute.
"""

from condcomp.compare.grid import Grid, load_grid
from condcomp.compare.report import markdown_table, terminal_table, write_report
from condcomp.compare.runner import VariantResult, finished_results, measure_variant, run_grid, train_variant

__all__ = ["Grid", "VariantResult", "finished_results", "load_grid", "markdown_table", "measure_variant", "run_grid",
           "terminal_table", "train_variant", "write_report"]
