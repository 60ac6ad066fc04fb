"""The DiT grid's report: a table of each variant at the shared FLOP budget (held-out flow loss, the
judge's class accuracy on samples, Fréchet distance to held-out digits), the verdict on EC-DiT's
claim, curves against training FLOPs, the variants' samples side by side (same labels, same noise),
and where expert choice spent compute: per sampling step, how many experts chose each patch.

Writes report.md with PNGs, and report.html with the same content and the images inlined.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np
import torch

from condcomp.files import write_bytes_atomic
from condcomp.train.metrics_log import MetricsLog

SAMPLE_SEED = 2024
HEATMAP_TIMES = 5  # sampling steps shown in the heat map


def _records(run_dir: Path) -> list[dict]:
    return MetricsLog(run_dir / "metrics.jsonl").read()


def _evals(records: list[dict]) -> list[dict]:
    return [r for r in records if "frechet" in r]


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    return buf.getvalue()


def _curves(results: dict[str, list[dict]], key: str, ylabel: str):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for name, records in results.items():
        pts = [(r["flops"], r[key]) for r in records if r.get(key) is not None]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=name)
    ax.set_xlabel("training FLOPs (executed)")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    data = _png(fig)
    plt.close(fig)
    return data


@torch.no_grad()
def _samples_and_routing(grid, per_class: int = 4):
    """Each variant's EMA model sampled with the same labels and noise; for MoE variants, the
    number of experts that chose each patch, per sampling step (conditional half of the batch),
    averaged over layers: {name: (images [n, 1, H, W], counts [steps, n, side, side] or None)}."""
    from condcomp.models.flow import sample
    from condcomp.train.dit_trainer import load_dit

    out = {}
    for name, cfg in grid.variants.items():
        model, _ = load_dit(cfg.run_dir)
        labels = torch.arange(cfg.model.num_classes).repeat_interleave(per_class)
        n, side = len(labels), cfg.model.image_size // cfg.model.patch
        steps: list[torch.Tensor] = []
        per_call: list[torch.Tensor] = []
        routers = [blk.ffn.router for blk in model.blocks if hasattr(blk.ffn, "router")]

        def record(module, args, routing):
            counts = torch.bincount(routing.token_index, minlength=routing.num_tokens).float()
            per_call.append(counts.view(-1, side, side)[:n])  # the conditional half

        hooks = [r.register_forward_hook(record) for r in routers]

        def on_step(i, t, infos):
            if per_call:
                steps.append(torch.stack(per_call).mean(0))
                per_call.clear()

        images = sample(model, labels, steps=cfg.train.sample_steps, guidance=cfg.train.guidance,
                        generator=torch.Generator().manual_seed(SAMPLE_SEED), on_step=on_step)
        for h in hooks:
            h.remove()
        out[name] = (images, torch.stack(steps) if steps else None, labels, cfg)
    return out


def _sample_figure(samples):
    import matplotlib.pyplot as plt

    from condcomp.train.dit_trainer import image_grid

    fig, axes = plt.subplots(1, len(samples), figsize=(3.2 * len(samples), 7))
    for ax, (name, (images, _, labels, cfg)) in zip(np.atleast_1d(axes), samples.items()):
        ax.imshow(image_grid(images, rows=cfg.model.num_classes), cmap="gray", vmin=0, vmax=255)
        ax.set_title(name)
        ax.axis("off")
    data = _png(fig)
    plt.close(fig)
    return data


def _heatmap_figure(name, images, counts, show: int = 6):
    """Rows: sampling steps (noise -> image); columns: sample images; colour: experts per patch."""
    import matplotlib.pyplot as plt

    n_steps = counts.shape[0]
    picks = sorted({round(i * (n_steps - 1) / (HEATMAP_TIMES - 1)) for i in range(HEATMAP_TIMES)})
    cols = list(range(0, len(images), max(1, len(images) // show)))[:show]
    fig, axes = plt.subplots(len(picks) + 1, len(cols), figsize=(1.6 * len(cols), 1.6 * (len(picks) + 1)))
    vmax = float(counts.max())
    ts = torch.linspace(1.0, 0.0, n_steps + 1)
    for c, j in enumerate(cols):
        for r, s in enumerate(picks):
            im = axes[r, c].imshow(counts[s, j].numpy(), cmap="magma", vmin=0, vmax=vmax)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if c == 0:
                axes[r, c].set_ylabel(f"t={float(ts[s]):.2f}", fontsize=8)
        axes[-1, c].imshow(images[j, 0].clamp(-1, 1).numpy(), cmap="gray", vmin=-1, vmax=1)
        axes[-1, c].axis("off")
    fig.colorbar(im, ax=axes[:-1].ravel().tolist(), shrink=0.8, label="experts per patch (mean over layers)")
    fig.suptitle(f"{name}: where expert choice spent compute while sampling")
    data = _png(fig)
    plt.close(fig)
    return data


def _verdict(rows: dict[str, dict]) -> list[str]:
    ec = [n for n, r in rows.items() if r["ffn"] == "expert choice"]
    others = [n for n in rows if n not in ec]
    lines = []
    for e in ec:
        for key, what in (("val_loss", "held-out flow loss"), ("frechet", "Fréchet distance")):
            beaten = [o for o in others if rows[e][key] < rows[o][key]]
            lines.append(f"- {e} {what}: {rows[e][key]:.4g} vs " + ", ".join(f"{o} {rows[o][key]:.4g}" for o in others)
                         + (" — lower than all: **held**" if len(beaten) == len(others) else " — **did not hold**"))
        acc = rows[e]["sample_accuracy"]
        lines.append(f"- {e} judge accuracy on its samples: {acc:.1%} (goal ≥ 90%: {'met' if acc >= 0.9 else 'not met'})")
    lines.append("- One seed: differences smaller than the run-to-run noise (not measured here) are not evidence.")
    return lines


def write_dit_report(grid, out: Path) -> Path:
    from condcomp.models.digit_judge import load_judge

    results = {name: _records(Path(cfg.run_dir)) for name, cfg in grid.variants.items()}
    judge_acc = load_judge(next(iter(grid.variants.values())).data.dataset)[1]
    rows = {}
    for name, cfg in grid.variants.items():
        records = results[name]
        evals = _evals(records)
        if not evals:
            continue
        last, end = evals[-1], records[-1]
        m = cfg.model
        ffn = m.ffn if m.ffn != "moe" else ("expert choice" if m.moe.router == "expert_choice" else f"top-{m.moe.k}")
        rows[name] = {"ffn": ffn, "steps": end["step"], "flops": end["flops"], "s_per_step": end["seconds"] / end["step"],
                      "val_loss": last["val_loss"], "sample_accuracy": last["sample_accuracy"], "frechet": last["frechet"]}
    figures = {"loss_vs_flops.png": _curves({n: _evals(r) for n, r in results.items()}, "val_loss", "held-out flow loss"),
               "frechet_vs_flops.png": _curves({n: _evals(r) for n, r in results.items()}, "frechet",
                                               "Fréchet distance (judge features)")}
    samples = _samples_and_routing(grid)
    figures["samples.png"] = _sample_figure(samples)
    for name, (images, counts, _, cfg) in samples.items():
        if counts is not None and cfg.model.moe.router == "expert_choice":
            figures[f"routing_{name}.png"] = _heatmap_figure(name, images, counts)
    for fname, data in figures.items():
        write_bytes_atomic(out / fname, data)

    head = ["variant", "FFN", "steps", "train FLOPs", "s/step", "held-out flow loss", "judge accuracy", "Fréchet distance"]
    table = [[n, r["ffn"], str(r["steps"]), f"{r['flops']:.3g}", f"{r['s_per_step']:.3f}", f"{r['val_loss']:.4f}",
              f"{r['sample_accuracy']:.1%}", f"{r['frechet']:.2f}"] for n, r in rows.items()]
    verdict = _verdict(rows)
    md = [f"# {grid.name}: DiT variants at {grid.flops:.3g} training FLOPs", "",
          f"The judge (a CNN trained on the training digits) scores {judge_acc:.1%} on held-out real digits.", "",
          "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    md += ["| " + " | ".join(row) + " |" for row in table]
    md += ["", "## The claim: EC-DiT converges faster and generates better", *verdict, ""]
    md += [f"![{f}]({f})" for f in figures]
    (out / "report.md").write_text("\n".join(md) + "\n")

    def img(fname: str) -> str:
        return f'<img alt="{html.escape(fname)}" src="data:image/png;base64,{base64.b64encode(figures[fname]).decode()}">'

    page = ("<!doctype html><html><head><meta charset=utf-8><title>" + html.escape(grid.name) + "</title>"
            "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 8px;border-bottom:1px solid #ddd}"
            "img{max-width:100%;margin:1em 0}</style></head><body>"
            f"<h1>{html.escape(grid.name)}: DiT variants at {grid.flops:.3g} training FLOPs</h1>"
            "<table id=results><thead><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table)
            + "</tbody></table><h2>The claim</h2><ul>"
            + "".join(f"<li>{html.escape(v[2:])}</li>" for v in verdict) + "</ul>"
            + "".join(img(f) for f in figures) + "</body></html>")
    (out / "report.html").write_text(page)
    write_bytes_atomic(out / "results.json", json.dumps(rows, indent=1).encode())
    return out / "report.md"
