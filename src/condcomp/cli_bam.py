"""``condcomp bam``: branch a dense seed per data domain, train the branches, merge them (BAM)."""

from __future__ import annotations

from condcomp.cli_args import number
from condcomp.device import DEVICE_HELP, device_spec


def _bam(args) -> int:
    from condcomp.train.bam import run_bam

    result = run_bam(seed=args.seed, domains=args.domains, steps=args.steps, out=args.out, attention=args.attention,
                     k=args.k, include_seed=not args.no_seed_expert, capacity_factor=args.capacity_factor,
                     overrides=list(args.set or []) + ([f"train.device={args.device}"] if args.device else []))
    print(f"merged {len(result.branch_dirs)} branches{'' if args.no_seed_expert else ' and the seed'} "
          f"(branch training: {result.branch_flops:.3g} FLOPs) into {result.merged_dir}\n"
          f"  condcomp train --init {result.merged_dir} --set run_dir=... --set train.steps=...")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("bam", help="BAM: train one copy of a dense seed per data domain, then merge them into FFN "
                                   "and attention experts")
    p.add_argument("--seed", required=True, help="the dense seed: a condcomp run or checkpoint folder")
    p.add_argument("--domains", nargs="+", required=True, metavar="DOMAIN",
                   help="one branch per domain: stdlib, python-docs, kjv, bbc-news, or a text file/folder")
    p.add_argument("--steps", type=number(int, minimum=1, maximum=10**9), required=True,
                   help="training steps of each branch")
    p.add_argument("--out", required=True, help="folder for branches/<domain>, merged/ and bam.json")
    p.add_argument("--attention", choices=("soft", "soft_shared_kv", "none"), default="soft",
                   help="attention experts: soft routing (every expert runs), the same with shared keys/values, "
                        "or none (FFN experts only; attention averaged)")
    p.add_argument("--k", type=number(int, minimum=1, maximum=4096), default=2, help="FFN experts per token (top-k)")
    p.add_argument("--capacity-factor", type=number(float, minimum=0.0, strictly=True),
                   help="FFN expert capacity (default dropless)")
    p.add_argument("--no-seed-expert", action="store_true", help="do not keep the seed itself as one expert")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a key of every branch's config (e.g. train.lr=1e-3)")
    p.add_argument("--device", type=device_spec, help=DEVICE_HELP + " (default: auto)")
    p.set_defaults(func=_bam)
