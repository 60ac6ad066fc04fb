"""``condcomp plot RUN_DIR...``: training and validation curves of one or several runs, and the expert
or token loads of routed models, from their own metrics.jsonl; a PNG per figure and a small HTML page.

    condcomp plot runs/dense runs/moe-top2 --out runs/plots     # -> runs/plots/index.html
"""

from __future__ import annotations

import base64
import html
import os
from pathlib import Path

from condcomp.data import DataError
from condcomp.train.metrics_log import MetricsLog


class PlotError(DataError):
    """A run folder has nothing to plot; the message names it."""


def _runs(run_dirs: list[str | Path]) -> dict[str, list[dict]]:
    runs = {}
    for d in run_dirs:
        path = Path(d)
        records = MetricsLog(path / "metrics.jsonl").read()
        if not records:
            raise PlotError(f"{path}: no metrics.jsonl with records; give run folders written by condcomp train")
        name = path.name
        while name in runs:
            name += "'"
        runs[name] = records
    return runs


def _loads(records: list[dict]) -> dict[str, list[float]]:
    """Per routed layer, its mean tokens per expert/group over the logged steps (from the metrics
    named <layer>...tokens_per_expert)."""
    sums: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    for r in records:
        for k, v in r.items():
            if k.endswith("tokens_per_expert") and isinstance(v, list):
                acc = sums.setdefault(k, [0.0] * len(v))
                if len(acc) == len(v):
                    sums[k] = [a + b for a, b in zip(acc, v)]
                    counts[k] = counts.get(k, 0) + 1
    return {k.removesuffix(".tokens_per_expert"): [x / counts[k] for x in v] for k, v in sums.items()}


def plot_runs(run_dirs: list[str | Path], out_dir: str | Path) -> Path:
    """Write loss.png, val.png, loads-<run>.png (routed runs) and index.html into out_dir; return the page."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = _runs(run_dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures: list[tuple[str, Path]] = []

    curves = [("loss", "training loss (nats/token)", "Training loss", {}),
              ("val_bpb", "validation bits/byte", "Validation bits/byte", {"marker": "o"})]
    for key, ylabel, title, style in curves:
        series = {name: [(r["step"], r[key]) for r in records if key in r] for name, records in runs.items()}
        if not any(series.values()):
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for name, points in series.items():
            if points:
                ax.plot(*zip(*points), label=name, **style)
        ax.set(xlabel="step", ylabel=ylabel, title=title)
        ax.legend()
        fig.tight_layout()
        path = out / ("loss.png" if key == "loss" else "val.png")
        fig.savefig(path)
        plt.close(fig)
        figures.append((title, path))

    for name, records in runs.items():
        loads = _loads(records)
        if not loads:
            continue
        fig, axes = plt.subplots(1, len(loads), figsize=(3.2 * len(loads), 3), squeeze=False)
        for ax, (layer, load) in zip(axes[0], loads.items()):
            ax.bar(range(len(load)), load)
            ax.set(title=layer, xlabel="expert / group", ylabel="mean tokens per step")
        fig.suptitle(f"{name}: routing loads")
        fig.tight_layout()
        fname = out / f"loads-{name.replace(chr(39), '_')}.png"
        fig.savefig(fname)
        plt.close(fig)
        figures.append((f"{name}: routing loads", fname))

    parts = [f"<h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' src='data:image/png;base64,"
             f"{base64.b64encode(path.read_bytes()).decode()}'>" for title, path in figures]
    page = out / "index.html"
    tmp = page.with_suffix(".tmp")
    tmp.write_text("<!doctype html><html lang='en'><head><meta charset='utf-8'><title>condcomp plot</title>"
                   "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}img{max-width:100%}</style>"
                   f"</head><body><h1>condcomp plot: {html.escape(', '.join(runs))}</h1>{''.join(parts)}</body></html>")
    os.replace(tmp, page)
    return page
