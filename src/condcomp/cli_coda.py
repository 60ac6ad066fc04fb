"""``condcomp coda ...``: convert a pretrained encoder, train it on a classification task, evaluate, bench."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from condcomp.cli_args import number
from condcomp.config import ConfigError
from condcomp.device import add_device_option, resolve_device


def _layers(text: str | None) -> list[int] | None:
    if text in (None, "all"):
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"--layers takes 'all' or comma-separated layer indices such as 0,2,4; got {text!r}") from None


def _train(args) -> int:
    from condcomp.convert import convert, load_encoder
    from condcomp.data.labelled import load_labelled
    from condcomp.train.classify import ClassifyConfig, Tokenized, train_classifier

    cfg = ClassifyConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, precision=args.precision,
                         seed=args.seed, distill_steps=args.distill_steps)
    columns = {"text_column": args.text_column, "label_column": args.label_column}
    train = load_labelled(args.task, "train", **columns).take(args.train_examples)
    val = load_labelled(args.task, "val", **columns).take(args.val_examples)
    base, tokenizer = load_encoder(args.model)
    positions = getattr(base.config, "max_position_embeddings", None)
    if positions is not None and args.max_length > positions:
        raise ConfigError(f"--max-length {args.max_length} exceeds the {positions} positions of {args.model}; "
                          f"use --max-length {positions} or less")
    import torch

    torch.manual_seed(args.seed)  # the new weights (routers, adapters, head) come from the seed
    model = convert(base, method=args.method, reduction=args.reduction, adapter_dim=args.adapter_dim,
                    layers=_layers(args.layers), num_labels=len(train.label_names), label_names=train.label_names,
                    base_model=args.model, max_length=args.max_length, dropout=args.dropout)
    model.to(resolve_device(args.device))
    out = Path(args.out or Path("runs") / f"coda-{Path(args.task).stem}-{args.method}"
                                           f"{'-r' + str(args.reduction) if args.method == 'coda' else ''}")
    print(f"condcomp coda train: {args.method} on {train.description} ({len(train)} examples), "
          f"{model.trainable_parameters():,} trainable parameters; run folder {out}")
    result = train_classifier(model, Tokenized(train, tokenizer, args.max_length),
                              Tokenized(val, tokenizer, args.max_length), cfg, out, tokenizer=tokenizer,
                              resume=not args.restart)
    meta_path = out / "task.json"
    meta_path.write_text(json.dumps({"task": args.task, **columns}, indent=2))
    print(f"val accuracy {result['val_accuracy']:.4f} after {result['steps']} steps "
          f"({result['train_seconds']:.0f} s); model saved in {out}")
    return 0


def _eval(args) -> int:
    from condcomp.convert import load_converted
    from condcomp.data.labelled import load_labelled
    from condcomp.train.classify import Tokenized, evaluate_accuracy

    model, tokenizer, meta = load_converted(args.checkpoint)
    model.to(resolve_device(args.device))
    task_file = Path(args.checkpoint) / "task.json"
    task = json.loads(task_file.read_text()) if task_file.is_file() else {}
    name = args.task or task.get("task")
    if name is None:
        raise ConfigError("this model folder does not record its task; pass --task rt|bbc|FILE")
    data = load_labelled(name, args.split, text_column=task.get("text_column", "text"),
                         label_column=task.get("label_column", "label")).take(args.examples)
    if data.label_names != model.config.label_names:
        raise ConfigError(f"the model predicts {model.config.label_names} but {name!r} has labels {data.label_names}")
    acc = evaluate_accuracy(model, Tokenized(data, tokenizer, model.config.max_length), precision=args.precision)
    print(f"{data.description}: accuracy {acc:.4f} on {len(data)} examples "
          f"({model.config.method}{', r=' + str(model.config.reduction) if model.config.method == 'coda' else ''})")
    return 0


def _bench(args) -> int:
    from condcomp.bench.coda_speed import bench_coda, speed_table

    rows = bench_coda(model_name=args.model, lengths=args.lengths, batches=args.batches, reductions=args.reductions,
                      adapter_dim=args.adapter_dim, rounds=args.rounds, precision=args.precision)
    table = speed_table(rows)
    print(f"\nCPU inference, {args.precision}, speed-up over the dense encoder (median time per forward):\n")
    print(table)
    if args.out:
        Path(args.out).write_text(json.dumps([vars(r) for r in rows], indent=2))
    return 0


def add_parser(sub) -> None:
    c = sub.add_parser("coda", help="CoDA: conditional adapters on a pretrained encoder (train, eval, bench)")
    csub = c.add_subparsers(dest="coda_command", required=True)

    t = csub.add_parser("train", help="convert a pretrained encoder and train it on a classification task")
    t.add_argument("--task", default="rt", help="rt (Rotten Tomatoes), bbc (BBC News), or a .csv/.jsonl file")
    t.add_argument("--method", default="coda", choices=("coda", "adapter", "probe", "finetune"),
                   help="CoDA, or a baseline: parallel adapters, a linear probe, full fine-tuning")
    t.add_argument("--reduction", "-r", type=number(int, minimum=1, maximum=4096), default=4, help="CoDA r: each layer computes n/r tokens")
    t.add_argument("--adapter-dim", type=number(int, minimum=1, maximum=65536), default=64, help="adapter width")
    t.add_argument("--layers", default="all", help="layers to convert: all, or indices such as 0,2,4")
    t.add_argument("--model", default="minilm", help="packaged model name or a Hugging Face model folder")
    t.add_argument("--max-length", type=number(int, minimum=2, maximum=1 << 20), default=128, help="tokens per example (longer ones are cut)")
    t.add_argument("--steps", type=number(int, minimum=1, maximum=10**9), default=300, help="training steps")
    t.add_argument("--distill-steps", type=number(int, minimum=0, maximum=10**9), default=0,
                   help="CoDA only: first train routers and adapters this many steps to reproduce the dense model")
    t.add_argument("--batch-size", type=number(int, minimum=1, maximum=1 << 16), default=16, help="examples per step")
    t.add_argument("--lr", type=number(float, minimum=0.0, strictly=True), default=1e-3, help="peak learning rate")
    t.add_argument("--precision", default="bf16", choices=("fp32", "bf16"), help="bf16 = autocast")
    t.add_argument("--seed", type=number(int, minimum=0, maximum=2**63 - 1), default=0,
                   help="seeds the new weights (routers, adapters, head) and the batches: same seed, same run")
    t.add_argument("--dropout", action="store_true", help="keep the pretrained layers' dropout on in training")
    t.add_argument("--train-examples", type=number(int, minimum=1), help="use only the first N training examples")
    t.add_argument("--val-examples", type=number(int, minimum=1), help="validate on only the first N examples")
    t.add_argument("--text-column", default="text", help="column (CSV) or key (JSONL) holding the text")
    t.add_argument("--label-column", default="label", help="column (CSV) or key (JSONL) holding the label")
    t.add_argument("--out", help="run folder (default runs/coda-<task>-<method>); re-run to resume")
    t.add_argument("--restart", action="store_true", help="ignore checkpoints already in the run folder")
    add_device_option(t)
    t.set_defaults(func=_train)

    e = csub.add_parser("eval", help="accuracy of a trained model folder on a split")
    e.add_argument("checkpoint", help="a folder written by `condcomp coda train`")
    e.add_argument("--task", help="default: the task it was trained on")
    e.add_argument("--split", default="test", choices=("train", "val", "test"), help="which split")
    e.add_argument("--examples", type=number(int, minimum=1), help="evaluate on only the first N examples")
    e.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="bf16 = autocast")
    add_device_option(e)
    e.set_defaults(func=_eval)

    b = csub.add_parser("bench", help="CPU inference speed: dense vs adapter vs CoDA at several r, in one run")
    b.add_argument("--model", default="minilm", help="packaged model name or a Hugging Face model folder")
    b.add_argument("--lengths", type=number(int, minimum=2, maximum=1 << 16), nargs="+", default=[128, 512],
                   help="tokens per example")
    b.add_argument("--batches", type=number(int, minimum=1, maximum=4096), nargs="+", default=[1, 32],
                   help="examples per batch")
    b.add_argument("--reductions", type=number(int, minimum=1, maximum=4096), nargs="+", default=[2, 4, 8],
                   help="CoDA r values to time")
    b.add_argument("--adapter-dim", type=number(int, minimum=1, maximum=65536), default=64, help="adapter width")
    b.add_argument("--rounds", type=number(int, minimum=1, maximum=1000), default=5, help="alternating timing rounds")
    b.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="bf16 = autocast")
    b.add_argument("--out", help="also write the rows as JSON here")
    b.set_defaults(func=_bench)


def run(args: argparse.Namespace) -> int:
    return args.func(args)
