"""The comparison report: a terminal table, report.md with PNG plots, and a self-contained report.html.

Every number comes from the variants' results (their own metrics logs and checkpoints); nothing here
computes a result of its own except the text shading, which re-runs each final model on validation text.
"""

from __future__ import annotations

import base64
import html
import importlib.metadata
import json
import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from condcomp.compare.grid import Grid
from condcomp.compare.runner import VariantResult
from condcomp.compare.stats import Estimate, estimate, verdict

COLUMNS = [("variant", "variant"), ("val bits/byte", "val_bpb"), ("params", "total_params"),
           ("active params", "active_params"), ("train FLOPs", "train_flops"), ("train tok/s", "train_tokens_per_s"),
           ("infer tok/s", "infer_tokens_per_s"), ("peak RSS MiB", "peak_rss_mib"), ("steps", "steps")]


@dataclass
class Summary:
    """A variant's runs over the grid's seeds (one run without seeds)."""

    name: str
    runs: list[VariantResult]

    @property
    def val(self) -> Estimate:
        return estimate([r.val_bpb for r in self.runs])

    def mean(self, key: str) -> float:
        return sum(getattr(r, key) for r in self.runs) / len(self.runs)


def summarize(results: list[VariantResult]) -> list[Summary]:
    """Results grouped by variant, in the order variants first appear (of the first view, in a grid
    with several budgets)."""
    views = _views(results)
    if views:
        results = [r for r in results if r.view == views[0]]
    groups: dict[str, list[VariantResult]] = {}
    for r in results:
        groups.setdefault(r.name, []).append(r)
    return [Summary(name, runs) for name, runs in groups.items()]


def _views(results: list[VariantResult]) -> list[str]:
    """The budget kinds of a grid with several (in order of appearance), else []."""
    out: list[str] = []
    for r in results:
        if r.view is not None and r.view not in out:
            out.append(r.view)
    return out


def _of_view(results: list[VariantResult], view: str) -> list[VariantResult]:
    return [r for r in results if r.view == view]


def _fmt_value(key: str, v) -> str:
    if key == "val_bpb":
        return f"{v:.4f}"
    if key in ("total_params", "active_params"):
        return f"{v / 1e6:.2f}M"
    if key == "train_flops":
        return f"{v:.3e}"
    if key in ("train_tokens_per_s", "infer_tokens_per_s", "peak_rss_mib"):
        return f"{v:,.0f}"
    if key == "steps":
        return f"{v:.0f}"
    return str(v)


def _fmt(key: str, r: VariantResult) -> str:
    return r.name if key == "variant" else _fmt_value(key, getattr(r, key))


def run_dir(out: Path, r: VariantResult) -> Path:
    """Where a result's run lives under a compare output folder."""
    return out / (r.view or "") / (f"seed-{r.seed}" if r.seed is not None else "") / "variants" / r.name


def _seeded(results: list[VariantResult]) -> bool:
    return any(len(s.runs) > 1 for s in summarize(results))


def _val_cells(s: Summary, baseline: Summary) -> list[str]:
    """mean ± sd, 95% CI and the comparison with the baseline's runs, for one variant."""
    est = s.val
    sd = "n/a" if est.n < 2 else f"{est.sd:.4f}"
    ci = "n/a (one seed)" if est.n < 2 else f"±{est.half_width:.4f}"
    if s is baseline:
        return [f"{est.mean:.4f} ± {sd}", ci, "(baseline)"]
    # Same seeds on both sides: compare replicate by replicate (paired), since a seed moves every
    # variant of its replicate alike.
    mine, theirs = {r.seed: r.val_bpb for r in s.runs}, {r.seed: r.val_bpb for r in baseline.runs}
    if set(mine) == set(theirs) and None not in mine:
        keys = sorted(mine)
        d = verdict([mine[k] for k in keys], [theirs[k] for k in keys], paired=True)
    else:
        d = verdict(list(mine.values()), list(theirs.values()))
    versus = f"{d.delta:+.4f}: {d.verdict}" if d.verdict == "one seed" else \
        f"{d.delta:+.4f} ± {d.half_width:.4f}: {d.verdict}"
    return [f"{est.mean:.4f} ± {sd}", ci, versus]


VIEW_NAMES = {"flops": "equal FLOPs", "seconds": "equal wall clock", "steps": "equal steps"}


def _view_head(results: list[VariantResult]) -> list[str]:
    seeded = _seeded(results)
    baseline = summarize(results)[0].name
    head = ["variant"]
    for view in _views(results):
        name = VIEW_NAMES[view]
        head += ([f"{name}: bits/byte (mean ± sd)", "95% CI", f"vs {baseline}"] if seeded
                 else [f"{name}: bits/byte"]) + [f"{name}: steps"]
    return head + [h for h, key in COLUMNS[2:] if key != "steps"]


def _view_rows(results: list[VariantResult]) -> list[list[str]]:
    """A column group per view (the variants' bits/byte and steps under that budget), then the first
    view's sizes, FLOPs and speeds."""
    seeded = _seeded(results)
    by_view = {view: {s.name: s for s in summarize_view(results, view)} for view in _views(results)}
    rows = []
    for s in summarize(results):
        row = [s.name]
        for view, summaries in by_view.items():
            mine = summaries.get(s.name)
            base = next(iter(summaries.values()))
            if mine is None:
                row += ["not run"] * (4 if seeded else 2)
                continue
            row += (_val_cells(mine, base) if seeded else [f"{mine.val.mean:.4f}"]) + [f"{mine.mean('steps'):.0f}"]
        rows.append(row + [_fmt_value(key, s.mean(key)) for _, key in COLUMNS[2:] if key != "steps"])
    return rows


def summarize_view(results: list[VariantResult], view: str) -> list[Summary]:
    groups: dict[str, list[VariantResult]] = {}
    for r in _of_view(results, view):
        groups.setdefault(r.name, []).append(r)
    return [Summary(name, runs) for name, runs in groups.items()]


def table_head(results: list[VariantResult]) -> list[str]:
    if _views(results):
        return _view_head(results)
    if not _seeded(results):
        return [h for h, _ in COLUMNS]
    baseline = summarize(results)[0].name
    return (["variant", "seeds", "val bits/byte (mean ± sd)", "95% CI", f"vs {baseline} (paired 95%)"]
            + [h for h, key in COLUMNS[2:]])


def table_rows(results: list[VariantResult]) -> list[list[str]]:
    """One row per variant: its run, or with seeds, the mean, spread and 95% interval of its final
    bits/byte and whether it differs from the first variant by more than the seed noise."""
    if _views(results):
        return _view_rows(results)
    if not _seeded(results):
        return [[_fmt(key, r) for _, key in COLUMNS] for r in results]
    summaries = summarize(results)
    baseline = summaries[0]
    return [[s.name, str(s.val.n), *_val_cells(s, baseline)] + [_fmt_value(key, s.mean(key)) for _, key in COLUMNS[2:]]
            for s in summaries]


def terminal_table(results: list[VariantResult]) -> str:
    head = table_head(results)
    rows = table_rows(results)
    widths = [max(len(head[i]), *(len(r[i]) for r in rows)) for i in range(len(head))]
    line = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([line(head), "  ".join("-" * w for w in widths)] + [line(r) for r in rows])


def markdown_table(results: list[VariantResult]) -> str:
    head = table_head(results)
    out = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in table_rows(results)]
    return "\n".join(out)


# ------------------------------------------------------------------------------------------------
# Plots


def plot_curves(results: list[VariantResult], out: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    axes = {"flops": ("total_flops", "training FLOPs"), "seconds": ("train_seconds", "training wall clock (s)"),
            "steps": ("step", "optimizer steps")}
    views = _views(results)
    if views:  # each view's runs against its own budget's axis
        plots = [(view, *axes[view], f"loss_equal_{view}.png") for view in views]
    else:
        plots = [(None, *axes[kind], f"loss_vs_{name}.png") for kind, name in
                 (("flops", "flops"), ("seconds", "time"), ("steps", "steps"))]
    for view, key, label, fname in plots:
        fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
        for summary in (summarize_view(results, view) if view else summarize(results)):
            # Seeds: the mean curve and a band of one standard deviation, over the evaluations every
            # seed reached (budgets end them at nearly the same step).
            n = min(len(r.curve) for r in summary.runs)
            xs = torch.tensor([[r.curve[i][key] for i in range(n)] for r in summary.runs], dtype=torch.float64)
            ys = torch.tensor([[r.curve[i]["val_bpb"] for i in range(n)] for r in summary.runs], dtype=torch.float64)
            label_n = f"{summary.name} ({len(summary.runs)} seeds)" if len(summary.runs) > 1 else summary.name
            line, = ax.plot(xs.mean(0), ys.mean(0), marker="o", ms=3, label=label_n)
            if len(summary.runs) > 1:
                sd = ys.std(0)
                ax.fill_between(xs.mean(0), ys.mean(0) - sd, ys.mean(0) + sd, color=line.get_color(), alpha=0.2)
        ax.set_xlabel(label)
        ax.set_ylabel("validation bits/byte")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(f"validation loss vs {label}" + (f" ({VIEW_NAMES[view]} runs)" if view else ""))
        fig.tight_layout()
        fig.savefig(out / fname)
        plt.close(fig)
        paths[fname] = out / fname
    return paths


def pareto_front(points: list[tuple[float, float]], *, higher_x_better: bool) -> list[int]:
    """Indices of the points no other point beats on both axes: y (bits/byte) lower, and x higher
    (speed) or lower (parameters)."""
    front = []
    for i, (x, y) in enumerate(points):
        beaten = any((x2 >= x if higher_x_better else x2 <= x) and y2 <= y and (x2, y2) != (x, y)
                     for j, (x2, y2) in enumerate(points) if j != i)
        if not beaten:
            front.append(i)
    return front


def plot_pareto(results: list[VariantResult], out: Path) -> dict[str, Path]:
    """Quality against cost for every variant (mean over seeds): validation bits/byte against measured
    inference tokens/s, and against active parameters per token, with the Pareto front marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summaries = summarize(results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    for ax, key, label, higher in ((axes[0], "infer_tokens_per_s", "inference tokens/s (measured)", True),
                                   (axes[1], "active_params", "active parameters per token", False)):
        points = [(s.mean(key), s.val.mean) for s in summaries]
        front = pareto_front(points, higher_x_better=higher)
        for i, (s, (x, y)) in enumerate(zip(summaries, points)):
            ax.scatter([x], [y], s=40 if i in front else 18, color="#d9822b" if i in front else "#888", zorder=3)
            ax.annotate(s.name, (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
        line = sorted(points[i] for i in front)
        ax.plot([p[0] for p in line], [p[1] for p in line], color="#d9822b", lw=1, zorder=2, label="Pareto front")
        ax.set_xlabel(label)
        ax.set_ylabel("validation bits/byte")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("quality vs cost: lower is better; the front holds the variants nothing beats on both axes", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "pareto.png")
    plt.close(fig)
    return {"pareto.png": out / "pareto.png"}


def plot_routing_health(results: list[VariantResult], out: Path) -> dict[str, Path]:
    from condcomp.compare.routing_health import plot_health

    paths = {}
    for r in results:
        if r.routing:
            fname = f"routing_{r.name}.png"
            plot_health(r.name, r.routing, out / fname)
            paths[fname] = out / fname
    return paths


def routing_health_table(results: list[VariantResult]) -> str:
    """Markdown: per MoE layer of each variant, dead experts, dropped fraction and router entropy over
    the last quarter of training ("" when no variant routes to experts)."""
    from condcomp.compare.routing_health import summarize_health

    rows = []
    for r in results:
        for layer, health in r.routing.items():
            h = summarize_health(health)
            rows.append(f"| {r.name} | {layer} | {h['dead_experts']} of {health['num_experts']} | "
                        f"{100 * h['dropped']:.1f}% | {h['entropy_ratio']:.2f} |")
    if not rows:
        return ""
    return "\n".join(["| variant | layer | dead experts | tokens dropped | router entropy / max |",
                      "|---|---|---:|---:|---:|", *rows])


def changes_markdown(grid: Grid) -> list[str]:
    """Per variant, every resolved setting that differs from the base (and what it inherited)."""
    if grid.base is None:
        return []
    md = ["## What each variant changes", "",
          "Resolved settings that differ from the base config (budget and run folder aside). A technique's FFN "
          "takes the base model's activation unless the variant sets it; those are listed as inherited.", ""]
    for name in grid.variants:
        changes = grid.changes(name)
        inherited = grid.inherited.get(name, [])
        text = "; ".join(changes) if changes else "nothing (the base itself)"
        md.append(f"- **{name}**: {text}" + (f" (inherited from the base: {', '.join(inherited)})" if inherited else ""))
    return md + [""]


def plot_loads(results: list[VariantResult], out: Path) -> dict[str, Path]:
    """Per-layer bars: tokens each expert (or block) processed on a validation batch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = {}
    for r in results:
        if not r.loads:
            continue
        names = list(r.loads)
        fig, axes = plt.subplots(1, len(names), figsize=(2.6 * len(names) + 1, 2.8), dpi=110, squeeze=False)
        for ax, name in zip(axes[0], names):
            loads = r.loads[name]
            ax.bar(range(len(loads)), loads, color="#d9822b")
            ax.set_title(name.replace("blocks.", "layer ").replace(".router", ""), fontsize=8)
            ax.set_xlabel("expert" if len(loads) > 1 else "selected tokens", fontsize=7)
            ax.tick_params(labelsize=7)
        fig.suptitle(f"{r.name}: tokens per expert / block, per layer", fontsize=9)
        fig.tight_layout()
        fname = f"loads_{r.name}.png"
        fig.savefig(out / fname)
        plt.close(fig)
        paths[fname] = out / fname
    return paths


# ------------------------------------------------------------------------------------------------
# Where the compute went


def shaded_text(run_dir: Path, n_bytes: int = 700) -> tuple[str, float, bool]:
    """HTML of a stretch of validation text, each byte shaded by the conditional computations it
    received in the final model (inference mode). Returns (html, max units, conditional?)."""
    from condcomp.compare.compute_map import compute_per_token, trace_routing
    from condcomp.data import load_corpus
    from condcomp.train.trainer import load_model

    model, cfg = load_model(run_dir)
    corpus = load_corpus(cfg.data.source, val_fraction=cfg.data.val_fraction, test_fraction=cfg.data.test_fraction,
                         cache_dir=cfg.data.cache_dir)
    n = min(n_bytes, cfg.model.seq_len, len(corpus.val))
    x = torch.from_numpy(corpus.val[:n].astype("int64"))[None]
    traces = trace_routing(model, x)
    units = compute_per_token(traces, n)
    top = float(units.max()) if traces else 0.0
    spans = []
    for byte, u in zip(x[0].tolist(), units.tolist()):
        ch = bytes([byte]).decode("utf-8", errors="replace")
        text = "<br>" if ch == "\n" else html.escape(ch).replace(" ", "&nbsp;")
        alpha = 0.0 if top == 0 else 0.08 + 0.8 * u / top
        spans.append(f'<span style="background:rgba(217,130,43,{alpha:.2f})" title="{u:g}">{text}</span>')
    return "".join(spans), top, bool(traces)


# ------------------------------------------------------------------------------------------------
# Provenance


def environment() -> dict[str, str]:
    def version(pkg):
        try:
            return importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=Path(__file__).resolve().parent).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"git commit": commit, "python": platform.python_version(),
            **{pkg: version(pkg) for pkg in ("condcomp", "torch", "numpy", "matplotlib", "safetensors")},
            "machine": f"{platform.system()} {platform.machine()}, {cpu}, {os.cpu_count()} cores, "
                       f"{torch.get_num_threads()} torch threads"}


# ------------------------------------------------------------------------------------------------


def write_report(grid: Grid, results: list[VariantResult], out_dir: str | Path) -> tuple[Path, Path]:
    """Write report.md (+ PNGs) and a self-contained report.html into out_dir."""
    out = Path(out_dir)
    firsts = [s.runs[0] for s in summarize(results)]  # loads and shading: each variant's first seed
    images = {**plot_curves(results, out), **plot_loads(firsts, out), **plot_pareto(results, out),
              **plot_routing_health(firsts, out)}
    from condcomp.compare.claims import claims_markdown, evaluate_claims

    claim_rows = evaluate_claims(grid, results)
    env = environment()
    seeds = grid.seeds or sorted({grid.variants[r.name].train.seed for r in results if r.name in grid.variants})
    unit = {"flops": "FLOPs", "seconds": "seconds", "steps": "optimizer steps"}
    budget = " and, in separate runs, ".join(f"{amount:.3g} training {unit[kind]}" for kind, amount in grid.budgets)
    budget += " per variant" + (" (one column group each; every run has its own LR schedule)" if grid.views else "")
    charged = [f"{s.name} {s.mean('prior_flops'):.3g}" for s in summarize(results) if s.mean("prior_flops")]
    if charged:
        budget += (", stages included: a variant that starts from a grid stage is charged that stage's training "
                   f"FLOPs ({', '.join(charged)}) and trains for the rest")

    md = [f"# condcomp compare: {grid.name}", "",
          f"Budget: {budget} (equal for every variant). Seed(s): {seeds}. "
          "Every number is read from the variant's own run: validation bits/byte and FLOPs from its "
          "metrics.jsonl (FLOPs counted by torch.utils.flop_counter), inference tokens/s timed on its final "
          "checkpoint, peak RSS of its training process.", "", markdown_table(results), ""]
    if claim_rows:
        md += ["## The papers' claims, checked", "",
               "Each row is computed from the runs above (`condcomp.compare.claims`); \"within noise\" means the "
               "seeds' 95% interval straddles the claim's threshold.", "", claims_markdown(claim_rows), ""]
    md += [f"![validation loss]({n})" for n in images if n.startswith("loss_")] + [""]
    md += ["## Quality against cost", "", "![Pareto front](pareto.png)", ""]
    health = routing_health_table(firsts)
    if health:
        md += ["## Routing health", "", "Over the last quarter of training (each variant's first seed): an expert "
               "is dead below 10% of a uniform share; entropy 1.0 = the router prefers nothing.", "", health, ""]
        md += [f"![{n}]({n})" for n in images if n.startswith("routing_")] + [""]
    for name in images:
        if name.startswith("loads_"):
            md += [f"![{name}]({name})", ""]
    md += changes_markdown(grid)
    md += ["## Environment", ""] + [f"- {k}: {v}" for k, v in env.items()]
    md += ["", "## Configs", ""]
    for name, cfg in grid.variants.items():
        md += [f"<details><summary>{name}</summary>", "", "```json", json.dumps(cfg.to_dict(), indent=1), "```",
               "</details>", ""]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md))

    def img(name: str, alt: str) -> str:
        data = base64.b64encode(images[name].read_bytes()).decode()
        return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'

    head = "".join(f"<th>{html.escape(h)}</th>" for h in table_head(results))
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table_rows(results))
    shading = []
    for r in firsts:
        text, top, conditional = shaded_text(run_dir(out, r))
        note = (f"darkest = {top:g} conditional computations (experts / blocks / heavy branches, summed over layers)"
                if conditional and top > 0 else "dense: every byte gets the same computation")
        shading.append(f"<h3>{html.escape(r.name)}</h3><p class=note>{note}</p><div class=text>{text}</div>")
    loads = "".join(img(n, n) for n in images if n.startswith("loads_"))
    claims_html = ""
    if claim_rows:
        cells = "".join(f"<tr><td>{html.escape(r.statement)} (equal {r.view})</td><td>{html.escape(r.paper)}</td>"
                        f"<td>{html.escape(r.measured)}</td><td><b>{html.escape(r.verdict)}</b></td></tr>"
                        for r in claim_rows)
        claims_html = ("<h2>The papers' claims, checked</h2><table class=\"results\" id=\"claims\"><thead><tr><th>claim"
                       "</th><th>paper's figure</th><th>measured here</th><th>verdict</th></tr></thead><tbody>"
                       f"{cells}</tbody></table>")
    health_html = ""
    if health:
        health_html = "<h2>Routing health</h2>" + "".join(img(n, n) for n in images if n.startswith("routing_"))
    changes_html = "".join(f"<li><b>{html.escape(n)}</b>: {html.escape('; '.join(grid.changes(n)) or 'the base itself')}"
                           f"{html.escape(' (inherited: ' + ', '.join(grid.inherited[n]) + ')' if n in grid.inherited else '')}"
                           "</li>" for n in grid.variants) if grid.base is not None else ""
    envrows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in env.items())
    configs = "".join(f"<details><summary>{html.escape(n)}</summary><pre>{html.escape(json.dumps(c.to_dict(), indent=1))}"
                      f"</pre></details>" for n, c in grid.variants.items())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>condcomp compare: {html.escape(grid.name)}</title>
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; padding: 0 1em; }}
table.results {{ border-collapse: collapse; margin: 1em 0; }}
table.results th, table.results td {{ padding: .35em .8em; border-bottom: 1px solid #ddd; text-align: right; }}
table.results td:first-child, table.results th:first-child {{ text-align: left; font-weight: 600; }}
img {{ max-width: 100%; margin: .5em 0; }}
.text {{ font: 12px/1.5 ui-monospace, monospace; border: 1px solid #eee; padding: .6em; }}
.note {{ color: #666; font-size: 13px; margin: 0; }}
</style></head><body>
<h1>condcomp compare: {html.escape(grid.name)}</h1>
<p>Budget: {html.escape(budget)}, seed(s) {seeds}. Every number comes from the variant's own run.</p>
<table class="results" id="results"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
{claims_html}
<h2>Validation loss</h2>{"".join(img(n, n) for n in images if n.startswith("loss_"))}
<h2>Quality against cost</h2>{img("pareto.png", "validation bits/byte against inference speed and active parameters")}
{health_html}
<h2>Where the compute went</h2>
<p class="note">Validation text; each byte shaded by how many conditional computations it received in the final model.</p>
{"".join(shading)}
{"<h3>Loads per layer</h3>" + loads if loads else ""}
{"<h2>What each variant changes</h2><ul>" + changes_html + "</ul>" if changes_html else ""}
<h2>Environment</h2><table>{envrows}</table>
<h2>Configs</h2>{configs}
</body></html>"""
    html_path = out / "report.html"
    html_path.write_text(page)
    return md_path, html_path
