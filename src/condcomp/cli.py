"""The ``condcomp`` command."""

from __future__ import annotations

import argparse
import sys
import time
from importlib import resources
from pathlib import Path

from condcomp.cli_args import number, prompt_ids
from condcomp.device import DEVICE_HELP, add_device_option, device_spec, resolve_device


def _train(args) -> int:
    from condcomp.cli_args import run_training
    from condcomp.train.pretrained_init import load_run_config

    overrides = list(args.set or [])
    if args.data:
        overrides.append(f"data.source={args.data}")
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    if args.init:
        overrides.append(f"model.init={args.init}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    config = args.config
    if args.resume and config is None:
        # Resuming without a config: continue with the one the run was started with.
        run_dir = Path(args.run_dir or _run_dir_from(overrides) or "runs/default")
        if (run_dir / "config.json").is_file():
            config = run_dir / "config.json"
    cfg = load_run_config(config, overrides)
    trainer, result = run_training(cfg, args.resume)
    if trainer.rt.is_main:
        val = "n/a" if result.val_bpb is None else f"{result.val_bpb:.4f}"
        print(f"finished step {result.step}: val {val} bits/byte; run folder {result.run_dir}")
    return 0


def _run_dir_from(overrides: list[str]) -> str | None:
    for assignment in reversed(overrides):
        if assignment.startswith("run_dir="):
            return assignment.split("=", 1)[1]
    return None


def _plot(args) -> int:
    from condcomp.compare.plot import plot_runs

    out = args.out or str(Path(args.run_dirs[0]).parent / "plots")
    page = plot_runs(args.run_dirs, out)
    print(f"plots of {len(args.run_dirs)} run(s): {page}")
    return 0


def _config(args) -> int:
    import yaml

    from condcomp.train.pretrained_init import load_run_config

    cfg = load_run_config(args.config, list(args.set or []))
    print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
    return 0


def _eval(args) -> int:
    import math

    from condcomp.distributed import Runtime
    from condcomp.train import load_model
    from condcomp.train.pretrained_init import load_run_corpus
    from condcomp.train.trainer import evaluate_split

    model, cfg = load_model(args.checkpoint)
    device = resolve_device(args.device)
    if args.data:
        cfg.data.source = args.data
    corpus, tokenizer = load_run_corpus(cfg)
    result = evaluate_split(model.to(device), corpus.split(args.split), batch_size=cfg.train.batch_size,
                            max_batches=args.batches, precision=cfg.train.precision, rt=Runtime(device=device),
                            token_bytes=corpus.bytes_of(args.split))
    extra = "" if tokenizer is None else f", token perplexity {math.exp(result['nll']):.2f}"
    print(f"{args.split} bits/byte: {result['bpb']:.4f}{extra}  ({corpus.description})")
    return 0


def _sample(args) -> int:
    import torch

    from condcomp.convert.prune import generate
    from condcomp.data import decode
    from condcomp.train import load_model
    from condcomp.train.pretrained_init import run_tokenizer

    model, cfg = load_model(args.checkpoint)
    device = resolve_device(args.device)
    model.to(device)
    _, tokenizer = run_tokenizer(cfg.data)
    g = torch.Generator(device=device).manual_seed(args.seed)
    prompt = prompt_ids(args.prompt, tokenizer).to(device)
    # A pruned model decodes as deployed: with its compact FFNs (chosen by the prompt, if conditioned).
    out = generate(model, prompt, args.length, temperature=args.temperature, top_k=args.top_k, generator=g)
    print(decode(out[0].tolist()) if tokenizer is None else tokenizer.decode(out[0].tolist()))
    return 0


def _convert_hf(args) -> int:
    from condcomp.convert.hf import from_hf
    from condcomp.train.pretrained_init import save_imported

    model, tokenizer = from_hf(args.source, seq_len=args.seq_len)
    path = save_imported(model, tokenizer, args.out, source=args.source)
    print(f"imported {args.source}: {model.num_parameters() / 1e6:.1f}M parameters, {model.cfg.n_layers} layers; "
          f"condcomp checkpoint in {path}\n"
          f"  condcomp sample --checkpoint {args.out} --prompt 'def '\n"
          f"  condcomp train --init {args.out} --set model.block=mod ...")
    return 0


def _upcycle(args) -> int:
    from condcomp.convert.upcycle import upcycle
    from condcomp.layers import MoE
    from condcomp.train.pretrained_init import load_model_source, save_imported

    dense, tokenizer = load_model_source(args.source, seq_len=args.seq_len)
    moe = upcycle(dense, num_experts=args.experts, k=args.k, every=args.every, layers=args.layers, router=args.router,
                  capacity_factor=args.capacity_factor, noise=args.noise, seed=args.seed,
                  granularity=args.granularity)
    path = save_imported(moe, tokenizer, args.out, source=f"upcycled from {args.source}")
    print(f"upcycled {args.source}: {sum(isinstance(b.ffn, MoE) for b in moe.blocks)} MoE layers of "
          f"{args.experts} experts, {moe.num_parameters() / 1e6:.1f}M parameters; checkpoint in {path}\n"
          f"  condcomp train --init {args.out} --set train.lr=1e-4 ...")
    return 0


def _export(args) -> int:
    from condcomp.convert.hf import to_hf
    from condcomp.train import load_model
    from condcomp.train.pretrained_init import run_tokenizer

    model, cfg = load_model(args.checkpoint)
    _, tokenizer = run_tokenizer(cfg.data)
    out = to_hf(model, tokenizer, args.out)
    kind = "MixtralForCausalLM" if cfg.model.ffn == "moe" else "LlamaForCausalLM"
    print(f"exported {args.checkpoint} as {kind} to {out}"
          f"{'' if tokenizer is not None else ' (byte-level model: no tokenizer written)'}")
    return 0


def _consolidate(args) -> int:
    from safetensors.torch import save_model

    from condcomp.files import atomic_path
    from condcomp.train import load_model
    from condcomp.train.checkpoint import checkpoint_format, resolve_checkpoint

    path = resolve_checkpoint(args.checkpoint)
    fmt = checkpoint_format(path)
    model, _ = load_model(path)  # every shard read, whole, in this process
    out = Path(args.out)
    with atomic_path(out) as tmp:
        save_model(model, str(tmp))
    print(f"wrote the {fmt} checkpoint {path} as one file, {out} ({model.num_parameters():,} parameters); "
          "condcomp export turns it into a Hugging Face folder")
    return 0


def _compare(args) -> int:
    from condcomp.compare import load_grid, run_grid, terminal_table, write_report

    overrides = list(args.set or []) + ([f"train.device={args.device}"] if args.device else [])
    grid = load_grid(args.grid, overrides)
    out = Path(args.out or Path("runs") / f"compare-{grid.name}")
    seeds = f", once per seed {grid.seeds}" if grid.seeds else ""
    budgets = " and, in separate runs, ".join(f"{amount:.3g} {kind}" for kind, amount in grid.budgets)
    print(f"condcomp compare: {len(grid.variants)} variants ({', '.join(grid.variants)}), each trained to "
          f"{budgets}{seeds}; results in {out} (re-run the same command to resume)")
    results = run_grid(grid, out)
    md, page = write_report(grid, results, out)
    print()
    print(terminal_table(results))
    if grid.claims:
        from condcomp.compare.claims import evaluate_claims

        print("\nthe papers' claims, checked on these runs:")
        for row in evaluate_claims(grid, results):
            print(f"- {row.statement} (equal {row.view}): {row.verdict.upper()}; {row.measured}\n    paper: {row.paper}")
    print(f"\nreport: {page}\n        {md}")
    return 0


def _demo(args) -> int:
    grid = args.grid or str(resources.files("condcomp") / "configs" / "grid-demo.yaml")
    out = args.out
    if out is None:
        # Each demo is a fresh comparison: keep earlier ones, number the new one.
        out = str(Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}")
    return _compare(argparse.Namespace(grid=grid, out=out, set=args.set, device=args.device))


def _techniques(args) -> int:
    import json

    from condcomp.techniques_listing import describe, render_text

    items = describe()
    print(json.dumps(items, indent=1) if args.json else render_text(items), end="" if not args.json else "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from condcomp import __version__

    p = argparse.ArgumentParser(prog="condcomp", description="Conditional computation for Transformers.")
    p.add_argument("--version", action="version", version=f"condcomp {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    # Every sub-command's --help shows each option's default.
    add_parser = sub.add_parser
    sub.add_parser = lambda *a, **k: add_parser(*a, formatter_class=argparse.ArgumentDefaultsHelpFormatter, **k)

    t = sub.add_parser("train", help="train a model from a YAML config (under torchrun: on every rank)")
    t.add_argument("--config", help="YAML file with model/data/train sections (default: the built-in defaults)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key, e.g. train.steps=100")
    t.add_argument("--data", help="text file or folder to train on (default: the config's data.source)")
    t.add_argument("--run-dir", help="where checkpoints and metrics go (default: the config's run_dir)")
    t.add_argument("--resume", nargs="?", const=True, metavar="CHECKPOINT",
                   help="continue the run from its newest checkpoint, or from the checkpoint folder given; "
                        "without --config, with the config the run was started with")
    t.add_argument("--init", metavar="MODEL", help="start from pretrained weights: a Hugging Face model folder, "
                   "a packaged model (smollm2) or a condcomp run folder (same as --set model.init=MODEL)")
    t.add_argument("--device", type=device_spec, help=DEVICE_HELP + " (default: the config's train.device, auto)")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="bits per byte of a checkpoint on a split")
    e.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    e.add_argument("--split", default="val", choices=("train", "val", "test"), help="which split")
    e.add_argument("--data", help="evaluate on this text instead of the training source")
    e.add_argument("--batches", type=number(int, minimum=1, maximum=10**7), default=64, help="evaluation batches (>= 1)")
    add_device_option(e)
    e.set_defaults(func=_eval)

    s = sub.add_parser("sample", help="generate text from a checkpoint")
    s.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    s.add_argument("--prompt", default="def ", help="text to continue")
    s.add_argument("--length", type=number(int, minimum=1, maximum=10**7), default=300, help="tokens (bytes) to generate")
    s.add_argument("--temperature", type=number(float, minimum=0.0), default=0.8, help="0 = greedy")
    s.add_argument("--top-k", type=number(int, minimum=1), default=40, help="sample among the k likeliest tokens")
    s.add_argument("--seed", type=number(int, minimum=0, maximum=2**63 - 1), default=0, help="random seed of the sampling")
    add_device_option(s)
    s.set_defaults(func=_sample)

    c = sub.add_parser("compare", help="train a grid of variants under equal compute and write a report")
    c.add_argument("--grid", required=True, help="grid YAML (see condcomp/configs/grid-demo.yaml)")
    c.add_argument("--out", help="output folder (default runs/compare-<grid name>); re-run to resume")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key in every variant")
    c.add_argument("--device", type=device_spec, help=DEVICE_HELP + " (default: the grid's train.device, auto)")
    c.set_defaults(func=_compare)

    d = sub.add_parser("demo", help="compare the techniques side by side on the built-in corpus (< 10 min)")
    d.add_argument("--grid", help="grid YAML (default: the packaged configs/grid-demo.yaml)")
    d.add_argument("--out", help="output folder (default runs/demo-<time>)")
    d.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key in every variant")
    d.add_argument("--device", type=device_spec, help=DEVICE_HELP + " (default: auto)")
    d.set_defaults(func=_demo)

    cv = sub.add_parser("convert", help="bring a pretrained model in")
    cvsub = cv.add_subparsers(dest="convert_command", required=True)
    ch = cvsub.add_parser("hf", help="a Hugging Face Llama-family decoder -> a condcomp checkpoint folder")
    ch.add_argument("source", help="a Hugging Face model folder or a packaged model (smollm2)")
    ch.add_argument("--out", required=True, help="the condcomp run folder to write")
    ch.add_argument("--seq-len", type=number(int, minimum=2, maximum=10**7), help="cap the context (default: the model's)")
    ch.set_defaults(func=_convert_hf)

    ex = sub.add_parser("export", help="a condcomp checkpoint -> a Hugging Face model folder (Llama or Mixtral)")
    ex.add_argument("checkpoint", help="run folder or checkpoint folder")
    ex.add_argument("--out", required=True, help="the Hugging Face model folder to write (must not exist or be empty)")
    ex.set_defaults(func=_export)

    co = sub.add_parser("consolidate", help="a checkpoint (sharded by train.fsdp, or whole) -> one safetensors file")
    co.add_argument("checkpoint", help="run folder or checkpoint folder")
    co.add_argument("--out", required=True, help="the .safetensors file to write (replaced atomically)")
    co.set_defaults(func=_consolidate)

    pl = sub.add_parser("plot", help="loss and validation curves (and routing loads) of runs, as PNGs and a page")
    pl.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run folders written by condcomp train")
    pl.add_argument("--out", help="output folder (default: plots/ beside the first run)")
    pl.set_defaults(func=_plot)

    cf = sub.add_parser("config", help="print the resolved config (defaults filled in, overrides applied)")
    cf.add_argument("--show", action="store_true", help="print it (the default and only action)")
    cf.add_argument("--config", help="YAML file (default: the built-in defaults)")
    cf.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    cf.set_defaults(func=_config)

    up = sub.add_parser("upcycle", help="sparse upcycling: a dense model's FFNs -> MoEs of copies (same output at step 0)")
    up.add_argument("--from", dest="source", required=True,
                    help="a condcomp run or checkpoint folder, a Hugging Face folder, or smollm2")
    up.add_argument("--experts", type=number(int, minimum=1, maximum=4096), required=True, help="experts per MoE layer")
    up.add_argument("--k", type=number(int, minimum=1, maximum=4096), default=2, help="experts per token (top_k)")
    up.add_argument("--every", type=number(int, minimum=1, maximum=4096), default=1,
                    help="upcycle layer i when (i + 1) %% every == 0")
    up.add_argument("--layers", type=number(int, minimum=0, maximum=10**6), nargs="+", metavar="I",
                    help="upcycle exactly these layers (indices from 0) instead of --every")
    up.add_argument("--router", choices=("top_k", "expert_choice"), default="top_k", help="routing of the new MoEs")
    up.add_argument("--capacity-factor", type=number(float, minimum=0.0, strictly=True),
                    help="top_k: expert capacity (default dropless); expert_choice: default 2.0")
    up.add_argument("--noise", type=number(float, minimum=0.0, maximum=1.0), default=0.0,
                    help="multiplicative noise on each expert's copy, so experts can diverge")
    up.add_argument("--granularity", type=number(int, minimum=1, maximum=4096), default=1,
                    help="fine-grained experts: cut each FFN into G segments (k counts whole FFNs)")
    up.add_argument("--seed", type=number(int, minimum=0, maximum=2**63 - 1), default=0, help="seeds router and noise")
    up.add_argument("--seq-len", type=number(int, minimum=2, maximum=10**7), help="cap the context of a HF model")
    up.add_argument("--out", required=True, help="the condcomp run folder to write")
    up.set_defaults(func=_upcycle)

    ls = sub.add_parser("techniques", help="list every technique a config can name, its settings, and whether it is causal")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=_techniques)

    from condcomp import cli_bam, cli_coda, cli_dit, cli_prune, cli_retrieval

    cli_coda.add_parser(sub)
    cli_bam.add_parser(sub)
    cli_dit.add_parser(sub)
    cli_prune.add_parser(sub)
    cli_retrieval.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from condcomp.errors import user_errors
    from condcomp.train import TrainingInterrupted

    try:
        return args.func(args)
    except TrainingInterrupted as e:
        print(f"condcomp {args.command}: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"condcomp {args.command}: interrupted (a second Ctrl-C: nothing more was saved)", file=sys.stderr)
        return 130
    except user_errors() as e:
        print(f"condcomp {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
