"""Per-domain results of the upcycling grid (configs/grids/upcycling.yaml): validation bits/byte of
every variant (and of the seed) on each domain, and where each domain's tokens are routed.

    condcomp compare --grid configs/grids/upcycling.yaml --out runs/compare-upcycling
    condcomp compare --grid configs/grids/upcycling.yaml --out runs/compare-upcycling-seed1 --set train.seed=1
    python benchmarks/upcycling.py runs/compare-upcycling runs/compare-upcycling-seed1

Prints markdown tables, for each replicate (a whole run of the grid, seed model included):
1. final validation bits/byte per domain (the same fixed windows for every model);
2. FFN expert loads per domain for the BAM variants, experts named by the model they came from
   (does each domain prefer its own branch's experts?), and the upcycled model's loads;
3. the mean soft-attention gate of each attention expert per domain.
With several replicates, then a summary: each variant's final bits/byte on the grid's own validation
mixture and its mean over the three domains, mean ± sd over replicates, and Welch's 95% verdict
against continued dense training, paired by replicate (condcomp.compare.stats).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from condcomp.compare.compute_map import trace_routing
from condcomp.compare.stats import estimate, verdict
from condcomp.data import eval_batches, load_corpus
from condcomp.train.trainer import evaluate_split, load_model

DOMAINS = ("stdlib", "python-docs", "kjv")


def domain_vals(cache_dir) -> dict:
    """Each domain's validation split (byte arrays)."""
    return {d: load_corpus(d, cache_dir=cache_dir).val for d in DOMAINS}


@torch.no_grad()
def routing_by_domain(model, vals: dict, seq_len: int) -> tuple[dict, dict]:
    """(FFN loads, attention gates) per domain: loads[domain][router] = fraction of assignments per
    expert; gates[domain][layer] = mean gate per attention expert."""
    loads, gates = {}, {}
    for d, val in vals.items():
        totals, attn = {}, {}
        for x, _ in eval_batches(val, batch_size=16, seq_len=seq_len, max_batches=4):
            for tr in trace_routing(model, x):
                totals[tr.name] = totals.get(tr.name, 0) + tr.group_sizes.double()
            metrics = model(x).metrics
            for name, value in metrics.items():
                if name.endswith("attn.gates"):
                    attn.setdefault(name, []).append(value.double())
        loads[d] = {k: (v / v.sum()).tolist() for k, v in totals.items()}
        gates[d] = {k: torch.stack(v).mean(0).tolist() for k, v in attn.items()}
    return loads, gates


def replicate(out: Path, batches: int) -> dict:
    """Per-domain bits/byte of the seed and every finished variant of one grid run, printed with the
    routing tables; returns {model: {domain: bpb, "mixture": final val bpb of the run}}."""
    runs = {"seed (stage, before the budget)": out / "stages" / "seed"}
    runs.update({p.name: p for p in sorted((out / "variants").iterdir()) if (p / "result.json").is_file()})
    vals = None
    bpb, routing = {}, {}
    for name, run in runs.items():
        model, cfg = load_model(run)
        if vals is None:
            vals = domain_vals(cfg.data.cache_dir)
        bpb[name] = {d: evaluate_split(model, v, batch_size=16, max_batches=batches,
                                       precision=cfg.train.precision)["bpb"] for d, v in vals.items()}
        result = run / "result.json"
        if result.is_file():
            bpb[name]["mixture"] = json.loads(result.read_text())["val_bpb"]
        if cfg.model.ffn == "moe":
            routing[name] = routing_by_domain(model, vals, cfg.model.seq_len)
    print(f"\n## {out}\n")
    print("| model | " + " | ".join(DOMAINS) + " | mean of domains | run's validation mixture |")
    print("|---|" + "---:|" * (len(DOMAINS) + 2))
    for name, row in bpb.items():
        mean = sum(row[d] for d in DOMAINS) / len(DOMAINS)
        mix = f"{row['mixture']:.4f}" if "mixture" in row else "n/a"
        print(f"| {name} | " + " | ".join(f"{row[d]:.4f}" for d in DOMAINS) + f" | {mean:.4f} | {mix} |")
    for name, (loads, gates) in routing.items():
        bam = out / "stages" / ("bam-attn" if "attn" in name else "bam-ffn") / "bam.json"
        experts = json.loads(bam.read_text())["experts"] if name.startswith("bam") and bam.is_file() else None
        routers = list(next(iter(loads.values())))
        n = len(next(iter(loads.values()))[routers[0]])
        labels = experts or [f"e{i}" for i in range(n)]
        print(f"\n{name}: FFN expert loads per domain (fraction of token-expert assignments, mean over "
              f"{len(routers)} MoE layers)\n")
        print("| domain | " + " | ".join(labels) + " |")
        print("|---|" + "---:|" * n)
        for d in DOMAINS:
            mean = torch.tensor([loads[d][r] for r in routers]).mean(0)
            print(f"| {d} | " + " | ".join(f"{v:.3f}" for v in mean.tolist()) + " |")
        if gates[DOMAINS[0]]:
            layers = list(gates[DOMAINS[0]])
            print(f"\n{name}: mean attention gate per expert and domain (mean over {len(layers)} layers)\n")
            print("| domain | " + " | ".join(labels) + " |")
            print("|---|" + "---:|" * n)
            for d in DOMAINS:
                mean = torch.tensor([gates[d][layer] for layer in layers]).mean(0)
                print(f"| {d} | " + " | ".join(f"{v:.3f}" for v in mean.tolist()) + " |")
    return bpb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("outs", nargs="+", help="compare output folders of configs/grids/upcycling.yaml (replicates)")
    ap.add_argument("--batches", type=int, default=8, help="validation batches of 16 windows per domain")
    args = ap.parse_args()
    tables = [replicate(Path(o), args.batches) for o in args.outs]
    if len(tables) < 2:
        return
    names = [n for n in tables[0] if "mixture" in tables[0][n] and all(n in t for t in tables)]
    print(f"\n## Over {len(tables)} replicates: mean ± sd, and the difference from dense (paired t, 95%)\n")
    print("| variant | validation mixture | vs dense | mean of domains | vs dense |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        cells = []
        for metric in ("mixture", "domains"):
            values = [t[name]["mixture"] if metric == "mixture" else sum(t[name][d] for d in DOMAINS) / len(DOMAINS)
                      for t in tables]
            base = [t["dense"]["mixture"] if metric == "mixture" else sum(t["dense"][d] for d in DOMAINS) / len(DOMAINS)
                    for t in tables]
            est = estimate(values)
            cells.append(f"{est.mean:.4f} ± {est.sd:.4f}")
            if name == "dense":
                cells.append("(baseline)")
            else:
                d = verdict(values, base, paired=True)  # replicate by replicate: same seed model
                cells.append(f"{d.delta:+.4f} ± {d.half_width:.4f}: {d.verdict}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
