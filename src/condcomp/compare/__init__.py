"""``condcomp compare``: grids of variants trained under equal compute, measured, and reported.

    grid = load_grid("configs/grids/full.yaml")
    results = run_grid(grid, "runs/compare-full")          # resumable; one child process per variant
    md, html = write_report(grid, results, "runs/compare-full")

grid.py reads grids; runner.py trains and measures variants; report.py writes the table, plots and
pages; compute_map.py traces where each router sent the compute.
"""

from condcomp.compare.grid import Grid, load_grid
from condcomp.compare.report import terminal_table, write_report
from condcomp.compare.runner import VariantResult, measure_variant, run_grid, train_variant

__all__ = ["Grid", "VariantResult", "load_grid", "measure_variant", "run_grid", "terminal_table", "train_variant",
           "write_report"]
