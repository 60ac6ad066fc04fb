"""Quality of the long-context grid (configs/grids/long-context.yaml): every variant's bits/byte on
the built-in corpus and its passkey retrieval accuracy by needle depth.

    condcomp compare --grid configs/grids/long-context.yaml --out runs/long-context
    python benchmarks/long_context.py runs/long-context [--lengths 4096 2048] [--per-depth 16]

For each finished variant (its final checkpoint): validation bits/byte on the stdlib corpus alone
(the same fixed windows for every model, at the grid's context), and on evaluation passkey documents
(a seed the training data does not use) of each length, the fraction whose five-digit key the model
predicts entirely, and the fraction of digits right, at each depth (0.1 = the needle near the start,
0.9 = just before the question). Chance is 1e-5 for the key and 0.1 per digit.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from condcomp.data import load_corpus
from condcomp.data.passkey import passkey_examples, retrieval_accuracy
from condcomp.train.trainer import evaluate_split, load_model


def variant_dirs(out: Path) -> list[Path]:
    """Run folders of the grid's variants (those with a checkpoint), in the grid's order."""
    folder = out / "variants" if (out / "variants").is_dir() else out
    runs = [p for p in folder.iterdir() if p.is_dir() and any(p.glob("**/*.safetensors"))]
    order = {"dense": 0, "spla": 1, "block-sparse": 2, "linear": 3}
    return sorted(runs, key=lambda p: (order.get(p.name, 9), p.name))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="the grid's --out folder")
    p.add_argument("--lengths", type=int, nargs="+", help="passkey document lengths (default: the grid's seq_len)")
    p.add_argument("--per-depth", type=int, default=16)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--only", nargs="+", help="evaluate just these variants")
    p.add_argument("--json", type=Path, help="also write the numbers here")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    results = {}
    for run in variant_dirs(args.out):
        if args.only and run.name not in args.only:
            continue
        model, cfg = load_model(run)
        seq_len = cfg.model.seq_len
        stdlib = load_corpus("stdlib", cache_dir=cfg.data.cache_dir)
        bpb = evaluate_split(model, stdlib.val, batch_size=2, max_batches=args.eval_batches)["bpb"]
        row = {"attention": cfg.model.attention, "stdlib_bpb": bpb, "passkey": {}}
        for length in args.lengths or [seq_len]:
            row["passkey"][length] = retrieval_accuracy(model, passkey_examples(length, per_depth=args.per_depth))
        results[run.name] = row
        print(f"{run.name}: stdlib {bpb:.4f} bits/byte", flush=True)
    depths = sorted({d for r in results.values() for acc in r["passkey"].values() for d in acc})
    for length in sorted({n for r in results.values() for n in r["passkey"]}):
        print(f"\nPasskey retrieval at {length} bytes: whole key right (digits right), by needle depth\n")
        print("| variant | attention | stdlib bits/byte | " + " | ".join(f"depth {d:g}" for d in depths) + " | mean |")
        print("|---|---|---|" + "---|" * (len(depths) + 1))
        for name, r in results.items():
            acc = r["passkey"].get(length, {})
            cells = [f"{acc[d]['key']:.2f} ({acc[d]['digits']:.2f})" if d in acc else "—" for d in depths]
            mean = sum(a["key"] for a in acc.values()) / max(1, len(acc))
            print(f"| {name} | {r['attention']} | {r['stdlib_bpb']:.4f} | " + " | ".join(cells) + f" | {mean:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
