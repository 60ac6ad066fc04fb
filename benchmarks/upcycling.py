"""Per-domain results of the upcycling grid (configs/grids/upcycling.yaml): validation bits/byte of
every variant (and of the seed) on each domain, and where each domain's tokens are routed.

    condcomp compare --grid configs/grids/upcycling.yaml --out runs/compare-upcycling
    python benchmarks/upcycling.py runs/compare-upcycling

Prints markdown tables:
1. final validation bits/byte per domain (the same fixed windows for every model);
2. FFN expert loads per domain for the BAM variants, experts named by the model they came from
   (does each domain prefer its own branch's experts?), and the upcycled model's loads;
3. the mean soft-attention gate of each attention expert per domain.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from condcomp.compare.compute_map import trace_routing
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="the compare output folder of configs/grids/upcycling.yaml")
    ap.add_argument("--batches", type=int, default=8, help="validation batches of 16 windows per domain")
    args = ap.parse_args()
    out = Path(args.out)
    runs = {"seed (stage, before the budget)": out / "stages" / "seed"}
    runs.update({p.name: p for p in sorted((out / "variants").iterdir()) if (p / "result.json").is_file()})
    vals = None
    bpb, routing = {}, {}
    for name, run in runs.items():
        model, cfg = load_model(run)
        if vals is None:
            vals = domain_vals(cfg.data.cache_dir)
        bpb[name] = {d: evaluate_split(model, v, batch_size=16, max_batches=args.batches,
                                       precision=cfg.train.precision)["bpb"] for d, v in vals.items()}
        if cfg.model.ffn == "moe":
            routing[name] = routing_by_domain(model, vals, cfg.model.seq_len)
    print("| model | " + " | ".join(DOMAINS) + " | mean |")
    print("|---|" + "---:|" * (len(DOMAINS) + 1))
    for name, row in bpb.items():
        print(f"| {name} | " + " | ".join(f"{row[d]:.4f}" for d in DOMAINS) + f" | {sum(row.values()) / len(row):.4f} |")
    for name, (loads, gates) in routing.items():
        bam = out / "stages" / ("bam-attn" if "attn" in name else "bam-ffn") / "bam.json"
        experts = json.loads(bam.read_text())["experts"] if name.startswith("bam") and bam.is_file() else None
        routers = list(next(iter(loads.values())))
        n = len(next(iter(loads.values()))[routers[0]])
        labels = experts or [f"e{i}" for i in range(n)]
        print(f"\n{name}: FFN expert loads per domain (fraction of token-expert assignments, mean over "
              f"{len(routers)} MoE layers)")
        print("| domain | " + " | ".join(labels) + " |")
        print("|---|" + "---:|" * n)
        for d in DOMAINS:
            mean = torch.tensor([loads[d][r] for r in routers]).mean(0)
            print(f"| {d} | " + " | ".join(f"{v:.3f}" for v in mean.tolist()) + " |")
        if gates[DOMAINS[0]]:
            layers = list(gates[DOMAINS[0]])
            print(f"\n{name}: mean attention gate per expert and domain (mean over {len(layers)} layers)")
            print("| domain | " + " | ".join(labels) + " |")
            print("|---|" + "---:|" * n)
            for d in DOMAINS:
                mean = torch.tensor([gates[d][layer] for layer in layers]).mean(0)
                print(f"| {d} | " + " | ".join(f"{v:.3f}" for v in mean.tolist()) + " |")


if __name__ == "__main__":
    main()
