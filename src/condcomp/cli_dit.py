"""``condcomp dit``: train a class-conditional diffusion transformer on digits (dense, token-choice
MoE or expert-choice EC-DiT), draw samples into a PNG grid, and judge them."""

from __future__ import annotations

from pathlib import Path

from condcomp.cli_args import number
from condcomp.device import DEVICE_HELP, add_device_option, device_spec, resolve_device


def _train(args) -> int:
    from condcomp.dit_config import load_dit_config
    from condcomp.train.dit_trainer import DiTTrainer

    overrides = list(args.set or [])
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    config = args.config
    if args.resume and config is None and args.run_dir and (Path(args.run_dir) / "config.json").is_file():
        config = Path(args.run_dir) / "config.json"  # resume with the config the run started with
    cfg = load_dit_config(config, overrides)
    record = DiTTrainer(cfg, resume=args.resume).run()
    summary = ", ".join(f"{k} {record[k]:.4g}" for k in ("loss", "val_loss", "sample_accuracy", "frechet") if k in record)
    print(f"trained {cfg.run_dir} to step {record.get('step', '?')}: {summary}")
    return 0


def _sample(args) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from condcomp.files import write_bytes_atomic
    from condcomp.models.flow import sample
    from condcomp.train.dit_trainer import image_grid, load_dit, parse_classes

    model, cfg = load_dit(args.checkpoint)
    model.to(resolve_device(args.device))
    classes = parse_classes(args.classes, cfg.model.num_classes)
    labels = torch.tensor([c for c in classes for _ in range(args.per_class)])
    images = sample(model, labels, steps=args.steps, guidance=args.guidance,
                    generator=torch.Generator().manual_seed(args.seed)).cpu()
    grid = image_grid(images, rows=len(classes))
    import io

    buf = io.BytesIO()
    plt.imsave(buf, grid, cmap="gray", vmin=0, vmax=255, format="png")
    write_bytes_atomic(args.out, buf.getvalue())
    print(f"wrote {len(labels)} samples ({len(classes)} classes x {args.per_class}) to {args.out}")
    return 0


def _eval(args) -> int:
    import torch

    from condcomp.models.digit_judge import frechet_distance, judge_accuracy, judge_features, load_judge
    from condcomp.data.digits import load_digits
    from condcomp.models.flow import sample
    from condcomp.train.dit_trainer import load_dit

    model, cfg = load_dit(args.checkpoint)
    model.to(resolve_device(args.device))
    judge, judge_acc = load_judge(cfg.data.dataset)
    labels = torch.arange(args.samples) % cfg.model.num_classes
    images = sample(model, labels, steps=args.steps, guidance=args.guidance,
                    generator=torch.Generator().manual_seed(args.seed)).cpu()
    real, _ = load_digits(cfg.data.dataset, "test")
    fd = frechet_distance(judge_features(judge, images), judge_features(judge, real))
    print(f"{args.samples} samples, {args.steps} Euler steps, guidance {args.guidance:g}: judge accuracy "
          f"{judge_accuracy(judge, images.clamp(-1, 1), labels):.3f} (the judge itself: {judge_acc:.3f} on held-out "
          f"digits), Fréchet distance {fd:.2f}")
    return 0


def _compare(args) -> int:
    from condcomp.compare.dit_grid import run_dit_grid

    report = run_dit_grid(args.grid, args.out)
    print(report.read_text())
    print(f"report: {report} and {report.with_suffix('.html')}")
    return 0


def _sampling_args(p) -> None:
    p.add_argument("--checkpoint", required=True, help="a `condcomp dit train` run or checkpoint folder")
    p.add_argument("--steps", type=number(int, minimum=1, maximum=10000), default=20, help="Euler steps")
    p.add_argument("--guidance", type=number(float, minimum=0.0), default=2.0,
                   help="classifier-free guidance scale (0 unconditional, 1 conditional only)")
    p.add_argument("--seed", type=number(int, minimum=0), default=0, help="seed of the starting noise")
    add_device_option(p)


def add_parser(sub) -> None:
    p = sub.add_parser("dit", help="diffusion transformer on digits: train (dense, MoE, EC-DiT), sample, eval")
    dsub = p.add_subparsers(dest="dit_command", required=True)
    t = dsub.add_parser("train", help="train a DiT from a YAML config (model/data/train sections)")
    t.add_argument("--config", help="YAML file (default: the built-in defaults, MNIST 28x28)")
    t.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a key, e.g. model.ffn=moe")
    t.add_argument("--run-dir", help="where checkpoints and metrics go (default: the config's run_dir)")
    t.add_argument("--resume", action="store_true", help="continue the run from its newest checkpoint")
    t.add_argument("--device", type=device_spec, help=DEVICE_HELP + " (default: the config's train.device, auto)")
    t.set_defaults(func=_train)
    s = dsub.add_parser("sample", help="draw class-conditional samples into one PNG grid (a row per class)")
    _sampling_args(s)
    s.add_argument("--classes", default="0-9", help="class labels: 0-9, 3 or 1,4,7")
    s.add_argument("--per-class", type=number(int, minimum=1, maximum=1000), default=8, help="samples per class (a row each)")
    s.add_argument("--out", required=True, help="PNG file to write")
    s.set_defaults(func=_sample)
    e = dsub.add_parser("eval", help="judge samples: class accuracy and Fréchet distance to held-out digits")
    _sampling_args(e)
    e.add_argument("--samples", type=number(int, minimum=10, maximum=100000), default=500,
                   help="samples to judge, classes in turn")
    e.set_defaults(func=_eval)
    c = dsub.add_parser("compare", help="train DiT variants at equal FLOPs and write a report (samples, curves, "
                                        "where expert choice spent compute)")
    c.add_argument("--grid", required=True, help="grid YAML (configs/grids/ecdit.yaml)")
    c.add_argument("--out", required=True, help="folder for the variants' runs and the report")
    c.set_defaults(func=_compare)
