"""The XTR experiment (docs/retrieval.md): off-the-shelf MiniLM vs MiniLM fine-tuned with the ColBERT
objective vs with the XTR objective, each scored single-vector, ColBERT MaxSim (exhaustive, and as a
rerank of the k' candidates) and XTR retrieved-tokens-only, on BBC News (title -> article) and on
code search in the Python standard library (docstring -> function).

    .venv/bin/python -u benchmarks/retrieval.py --out runs/retrieval [--steps 300 --batch-size 32]

Fine-tuned encoders are written to OUT/<benchmark>-<objective> and reused when there (delete to retrain).
Writes OUT/results.json and prints one table per benchmark and encoder, then a k' sweep of the XTR
and ColBERT-rerank scorers and an HNSW-index row (approximate token search) for the XTR encoder.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from condcomp.retrieval import TokenEncoder, load_retrieval_set
from condcomp.retrieval.evaluate import build_index, evaluate
from condcomp.retrieval.report import result_table
from condcomp.retrieval.train import RetrievalTrainConfig, train_encoder


def encoder_for(name: str, bench: str, args) -> TokenEncoder:
    if name == "minilm":
        return TokenEncoder.from_pretrained("minilm")
    folder = Path(args.out) / f"{bench}-{name}"
    if (folder / "encoder.json").is_file():
        return TokenEncoder.load(folder)
    encoder = TokenEncoder.from_pretrained("minilm")
    torch.manual_seed(0)
    cfg = RetrievalTrainConfig(objective=name, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                               k_train=args.k_train, doc_max_length=args.doc_max_length)
    record = train_encoder(encoder, load_retrieval_set(bench, "train"), cfg, folder)
    print(f"trained {bench}-{name}: {record['train_seconds']:.0f} s, final loss {record['losses'][-1]:.3f}")
    return encoder


LABELS = {"minilm": "MiniLM off the shelf", "colbert": "fine-tuned, colbert objective",
          "xtr": "fine-tuned, xtr objective"}


def render(path: Path) -> None:
    """The tables of a finished run, from its results.json."""
    from condcomp.retrieval.evaluate import EvalResult, ScorerResult

    for r in json.loads(path.read_text()):
        fields = {k: v for k, v in r.items() if k in EvalResult.__dataclass_fields__}
        result = EvalResult(**{**fields, "rows": [ScorerResult(**row) for row in r["rows"]]})
        if r.get("sweep"):
            for row in result.rows:
                print(f"  k'={r['k_prime']:<5} {row.scorer:15} nDCG@10 {row.metrics['ndcg@10']:.4f}  R@100 "
                      f"{row.metrics['recall@100']:.3f}  p50 {row.p50_ms:6.2f} ms  scoring FLOPs {row.scoring_flops:.3g}")
            continue
        index = " (HNSW token index, M 32, efSearch 128)" if r.get("index") == "hnsw" else ""
        print(f"\n{r['benchmark']}{index}\n" + result_table(result, label=LABELS[r["encoder"]], k_prime=r["k_prime"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/retrieval")
    p.add_argument("--benchmarks", default="bbc,stdlib")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--k-train", type=int, default=256)
    p.add_argument("--k-prime", type=int, default=100)
    p.add_argument("--sweep", default="10,40,160,640")
    p.add_argument("--doc-max-length", type=int, default=128)
    p.add_argument("--encoders", default="minilm,colbert,xtr", help="which of minilm, colbert, xtr to evaluate")
    p.add_argument("--render", action="store_true", help="print the tables of OUT/results.json, run nothing")
    args = p.parse_args()
    if args.render:
        render(Path(args.out) / "results.json")
        return
    Path(args.out).mkdir(parents=True, exist_ok=True)
    results = []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for bench in args.benchmarks.split(","):
        data = load_retrieval_set(bench, "test")
        for name in args.encoders.split(","):
            encoder = encoder_for(name, bench, args)
            index, seconds, truncated = build_index(encoder, data, doc_max_length=args.doc_max_length)
            result = evaluate(encoder, data, k_prime=args.k_prime, index=index)
            result.encode_docs_seconds, result.truncated_docs = seconds, truncated
            label = LABELS[name]
            print("\n" + result_table(result, label=label, k_prime=args.k_prime), flush=True)
            results.append({"benchmark": bench, "encoder": name, "k_prime": args.k_prime, **asdict(result)})
            for k in (int(v) for v in args.sweep.split(",")):
                swept = evaluate(encoder, data, scorers=("colbert-rerank", "xtr"), k_prime=k, index=index)
                for row in swept.rows:
                    print(f"  k'={k:<5} {row.scorer:15} nDCG@10 {row.metrics['ndcg@10']:.4f}  R@100 "
                          f"{row.metrics['recall@100']:.3f}  p50 {row.p50_ms:6.2f} ms  scoring FLOPs "
                          f"{row.scoring_flops:.3g}", flush=True)
                results.append({"benchmark": bench, "encoder": name, "k_prime": k, "sweep": True, **asdict(swept)})
            if name == "xtr":
                hnsw, _, _ = build_index(encoder, data, doc_max_length=args.doc_max_length, kind="hnsw")
                approx = evaluate(encoder, data, scorers=("colbert-rerank", "xtr"), k_prime=args.k_prime, index=hnsw)
                print("\n  HNSW token index (M 32, efSearch 128):")
                print("\n".join("  " + line for line in
                                result_table(approx, label=label, k_prime=args.k_prime).splitlines()))
                results.append({"benchmark": bench, "encoder": name, "k_prime": args.k_prime, "index": "hnsw",
                                **asdict(approx)})
            (Path(args.out) / "results.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
