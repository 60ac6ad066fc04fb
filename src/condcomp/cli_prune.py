"""``condcomp prune``: FFN channel pruning of a dense model — train a pruned model with distillation
(input-conditioned, static L0 or magnitude), evaluate pruned models per domain, gather a trained one
into its compact dense model, and measure decoding speed."""

from __future__ import annotations

from pathlib import Path

from condcomp.cli_args import number, prompt_ids, run_training
from condcomp.device import DEVICE_HELP, device_spec


def _sparsity(text: str) -> float:
    import argparse

    value = number(float)(text)
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1) (the share of FFN channels pruned), got {text}")
    return value


def _train(args) -> int:
    from condcomp.train.pretrained_init import load_run_config

    run_dir = Path(args.run_dir)
    if args.resume and (run_dir / "config.json").is_file():
        cfg = load_run_config(run_dir / "config.json", list(args.set or []))  # the run's own config
    else:
        overrides = [f"model.init={args.init}", "model.ffn=prunable", f"model.prunable.method={args.method}",
                     f"model.prunable.sparsity={args.sparsity}", f"train.distill={args.distill}",
                     f"train.steps={args.steps}", f"train.lr={args.lr}", f"run_dir={args.run_dir}"]
        if args.prompt_len is not None:
            overrides.append(f"model.prunable.prompt_len={args.prompt_len}")
        if args.activation is not None:
            overrides.append(f"model.prunable.activation={args.activation}")
        if args.data:
            overrides.append(f"data.source={args.data}")
        cfg = load_run_config(None, overrides + list(args.set or []))
    if args.device:
        cfg.train.device = args.device
    trainer, result = run_training(cfg, args.resume)
    if trainer.rt.is_main:
        val = "n/a" if result.val_bpb is None else f"{result.val_bpb:.4f}"
        scored_from = max(trainer.loss_from, cfg.train.eval_from)
        print(f"finished step {result.step}: val {val} bits/byte (from position {scored_from}); "
              f"run folder {result.run_dir}\n  condcomp prune compact --checkpoint {result.run_dir} --out ...")
    return 0


def _eval(args) -> int:
    from condcomp.compare.prune_report import evaluate_runs, find_runs, write_report

    runs = find_runs(args.runs)
    if not runs:
        from condcomp.config import ConfigError

        raise ConfigError(f"no runs found in {args.runs}; give run folders or a grid's output folder")
    untrained = args.untrained_magnitude
    if untrained is None and len(args.runs) == 1 and (Path(args.runs[0]) / "stages" / "seed" / "checkpoints").is_dir():
        untrained = Path(args.runs[0]) / "stages" / "seed"  # a pruning grid's dense seed
    results = evaluate_runs(runs, domains=args.domains, prompt_len=args.prompt_len, batches=args.batches,
                            untrained_magnitude=untrained)
    report = write_report(results, args.out)
    print(report.read_text())
    print(f"report: {report}")
    return 0


def _compact(args) -> int:
    from condcomp.convert.prune import compact, compact_for_prompt
    from condcomp.train import load_model
    from condcomp.train.pretrained_init import run_tokenizer, save_imported

    model, cfg = load_model(args.checkpoint)
    _, tokenizer = run_tokenizer(cfg.data)
    if cfg.model.ffn == "prunable" and cfg.model.prunable.method == "conditioned":
        if args.prompt is None:
            from condcomp.config import ConfigError

            raise ConfigError("this model picks its channels per prompt; give the prompt with --prompt TEXT")
        small = compact_for_prompt(model, prompt_ids(args.prompt, tokenizer))
    else:
        small = compact(model)
    save_imported(small, tokenizer, args.out, source=f"pruned {args.checkpoint}")
    print(f"compact model (d_ff {cfg.model.ffn_hidden} -> {small.cfg.ffn_hidden}) saved to {args.out}")
    return 0


def _bench(args) -> int:
    from condcomp.bench.prune_speed import TABLE_HEAD, measure
    from condcomp.train.pretrained_init import load_model_source

    import torch

    dense, _ = load_model_source(args.model, seq_len=max(args.prompt_len + args.new_tokens, args.prefill_len))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model}, batch 1\n\n{TABLE_HEAD}")
    measure(dense, sparsities=args.sparsities, new_tokens=args.new_tokens, prompt_len=args.prompt_len,
            prefill_len=args.prefill_len, rounds=args.rounds, precisions=args.precisions)
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("prune", help="FFN channel pruning: input-conditioned (per prompt), static L0 or magnitude")
    psub = p.add_subparsers(dest="prune_command", required=True)

    t = psub.add_parser("train", help="prune a dense model's FFN channels while distilling from it")
    t.add_argument("--init", required=True, metavar="MODEL",
                   help="the dense model: a condcomp run folder, a Hugging Face folder or smollm2")
    t.add_argument("--method", choices=("conditioned", "static", "magnitude"), default="conditioned",
                   help="conditioned: a predictor picks the channels per prompt; static: one learned L0 mask; "
                        "magnitude: one mask by weight magnitude")
    t.add_argument("--sparsity", type=_sparsity, default=0.5, help="share of FFN channels pruned, in (0, 1)")
    t.add_argument("--prompt-len", type=number(int, minimum=1), help="conditioned: prompt tokens the predictors read "
                   "(default: the config's, 64)")
    t.add_argument("--activation", choices=("swiglu", "gelu"), help="the dense FFN's activation (default swiglu)")
    t.add_argument("--steps", type=number(int, minimum=1, maximum=10**9), default=500, help="training steps")
    t.add_argument("--lr", type=number(float, minimum=0.0, strictly=True), default=1e-3, help="learning rate")
    t.add_argument("--distill", type=number(float, minimum=0.0), default=1.0,
                   help="weight of the KL to the dense model's predictions (0 = LM loss only)")
    t.add_argument("--run-dir", required=True, help="where checkpoints and metrics go")
    t.add_argument("--data", help="text to train on (default stdlib; e.g. stdlib+python-docs+kjv+bbc-news)")
    t.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its newest checkpoint, "
                   "with the config it was started with")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")
    t.add_argument("--device", type=device_spec, help=DEVICE_HELP + " (default: the config's train.device, auto)")
    t.set_defaults(func=_train)

    e = psub.add_parser("eval", help="bits/byte per domain of pruned runs (or a pruning grid's output), the gap to "
                                     "dense, and which channels conditioned models keep per domain")
    e.add_argument("runs", nargs="+", help="run folders, or the output folder of a pruning grid")
    e.add_argument("--domains", nargs="+", default=["stdlib", "python-docs", "kjv", "bbc-news"],
                   help="validation text of each domain")
    e.add_argument("--prompt-len", type=number(int, minimum=1), default=64,
                   help="every model is scored from position prompt-len - 1 on")
    e.add_argument("--batches", type=number(int, minimum=1, maximum=10**6), default=8, help="batches of 16 windows per domain")
    e.add_argument("--untrained-magnitude", type=Path, metavar="DENSE_RUN",
                   help="also score this dense run pruned by magnitude without training (default: a grid's seed)")
    e.add_argument("--out", default="runs/prune-eval", help="folder for report.md, results.json and overlap PNGs")
    e.set_defaults(func=_eval)

    c = psub.add_parser("compact", help="gather a trained pruned model's kept channels into a smaller dense model")
    c.add_argument("--checkpoint", required=True, help="run or checkpoint folder of an ffn: prunable model")
    c.add_argument("--prompt", help="conditioned models: the prompt that picks the channels")
    c.add_argument("--out", required=True, help="folder for the compact model (a condcomp run folder)")
    c.set_defaults(func=_compact)

    b = psub.add_parser("bench", help="decode and prefill speed of pruned models vs dense, and the predictor's cost")
    b.add_argument("--model", default="smollm2", help="dense model: smollm2, a Hugging Face folder or a condcomp run")
    b.add_argument("--sparsities", type=_sparsity, nargs="+", default=[0.5, 0.75], help="shares of channels pruned")
    b.add_argument("--new-tokens", type=number(int, minimum=1, maximum=10**6), default=256, help="tokens generated")
    b.add_argument("--prompt-len", type=number(int, minimum=1, maximum=10**6), default=64, help="prompt tokens")
    b.add_argument("--prefill-len", type=number(int, minimum=1, maximum=10**6), default=512, help="prefill tokens")
    b.add_argument("--rounds", type=number(int, minimum=1, maximum=1000), default=3, help="alternating timing rounds")
    b.add_argument("--precisions", nargs="+", choices=("fp32", "bf16"), default=["fp32", "bf16"], help="precisions")
    b.set_defaults(func=_bench)
