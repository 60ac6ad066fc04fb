"""CoDA against its baselines on one task: accuracy, trainable parameters (issue: docs/coda.md).

Trains every method for the same steps x batch size on the task's train split, evaluates on its
val and test splits, and prints a markdown table. Each method's run folder is kept under --out;
a method whose result.json exists is not retrained, so an interrupted run resumes where it stopped.

    .venv/bin/python -u benchmarks/coda.py --task rt  --steps 600 --batch-size 32 --max-length 128
    .venv/bin/python -u benchmarks/coda.py --task bbc --steps 200 --batch-size 16 --max-length 512
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from condcomp.convert import convert, load_converted, load_encoder
from condcomp.data.labelled import load_labelled
from condcomp.train.classify import ClassifyConfig, Tokenized, evaluate_accuracy, train_classifier

# Peak learning rates: new small modules take a large one; full fine-tuning of a pretrained
# encoder the usual small one.
LR = {"probe": 3e-3, "adapter": 1e-3, "coda": 1e-3, "finetune": 1e-4}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="rt")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--reductions", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--distill-steps", type=int, default=0,
                   help="also train CoDA with this many distillation steps first (extra rows)")
    p.add_argument("--adapter-dim", type=int, default=64)
    p.add_argument("--methods", nargs="+", default=["probe", "adapter", "coda", "finetune"])
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--out", default=None, help="default runs/coda-bench-<task>")
    args = p.parse_args()
    out = Path(args.out or f"runs/coda-bench-{Path(args.task).stem}")

    train_set, val_set, test_set = (load_labelled(args.task, s) for s in ("train", "val", "test"))
    _, tokenizer = load_encoder()
    data = [Tokenized(d, tokenizer, args.max_length) for d in (train_set, val_set, test_set)]
    runs = []  # (method, r, distillation steps, folder)
    for method in args.methods:
        for r in (args.reductions if method == "coda" else [1]):
            runs.append((method, r, 0, out / (f"coda-r{r}" if method == "coda" else method)))
            if method == "coda" and args.distill_steps:
                runs.append((method, r, args.distill_steps, out / f"coda-r{r}-distill{args.distill_steps}"))

    rows = []
    for method, r, distill, folder in runs:
        if not (folder / "result.json").is_file():
            base, _ = load_encoder()
            model = convert(base, method=method, reduction=r, adapter_dim=args.adapter_dim,
                            num_labels=len(train_set.label_names), label_names=train_set.label_names,
                            max_length=args.max_length)
            cfg = ClassifyConfig(steps=args.steps, batch_size=args.batch_size, lr=LR[method], precision=args.precision,
                                 distill_steps=distill)
            print(f"== {method} r={r} distill {distill}: {model.trainable_parameters():,} trainable parameters, "
                  f"lr {cfg.lr}", flush=True)
            train_classifier(model, data[0], data[1], cfg, folder, tokenizer=tokenizer, progress=False)
        result = json.loads((folder / "result.json").read_text())
        if "test_accuracy" not in result:
            model, _, _ = load_converted(folder, with_tokenizer=False)  # the saved model, as a user loads it
            result["test_accuracy"] = evaluate_accuracy(model, data[2], precision="fp32")
            (folder / "result.json").write_text(json.dumps(result, indent=2))
        rows.append(result)
        print(f"{method} r={r} distill {distill}: val {result['val_accuracy']:.4f} test {result['test_accuracy']:.4f} "
              f"({result['train_seconds']:.0f} s training)", flush=True)

    print(f"\n{args.task}: {len(train_set)} train / {len(val_set)} val / {len(test_set)} test examples, "
          f"{args.steps} steps x batch {args.batch_size}, max {args.max_length} tokens\n")
    print("| method | val acc | test acc | trainable params | train time |")
    print("|---|---|---|---|---|")
    for res in rows:
        name = f"CoDA r={res['reduction']}" if res["method"] == "coda" else res["method"]
        if res.get("distill_steps"):
            name += f" + {res['distill_steps']} distillation steps"
        print(f"| {name} | {100 * res['val_accuracy']:.1f} | {100 * res['test_accuracy']:.1f} | "
              f"{res['trainable_parameters']:,} | {res['train_seconds']:.0f} s |")
    (out / "summary.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
