"""Resident memory of the training process over steps: dense vs routed variants, with glibc's default
malloc behaviour (``train.fast_allocator: false``), with the trainer's default (``fast``) and with
``train.low_memory`` (``condcomp.train.allocator``).

Each (variant, allocator) runs in its own fresh process: the full grid's model (configs/grids/full.yaml:
d_model 192, 4 layers, 256 tokens, batch 16, bf16) on the built-in corpus for ``--steps`` steps,
reading the process's RSS after every step (/proc/self/statm). Prints peak RSS, RSS at a few steps,
the ratio to dense under the same allocator, and the median step time.

    .venv/bin/python -u benchmarks/memory.py [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

VARIANTS = {
    "dense": [],
    "moe-top2": ["model.ffn=moe", "model.moe.k=2", "model.moe.capacity_factor=1.25", "model.moe.num_experts=8",
                 "model.moe.d_ff=384", "model.moe.moe_every=2"],
    "expert-choice": ["model.ffn=moe", "model.moe.router=expert_choice", "model.moe.capacity_factor=2.0",
                      "model.moe.expert_choice_mode=per_position", "model.moe.num_experts=8", "model.moe.d_ff=384",
                      "model.moe.moe_every=2"],
    "mod-12.5%": ["model.block=mod", "model.mod.capacity=0.125", "model.mod.every=2"],
    "skip": ["model.block=skip", "model.skip.target_rate=0.5"],
}
BASE = ["model.d_model=192", "model.n_layers=4", "model.n_heads=4", "model.seq_len=256", "model.ffn=swiglu",
        "data.source=stdlib", "train.batch_size=16", "train.lr=3e-3", "train.warmup_steps=50", "train.precision=bf16",
        "train.eval_every=100000", "train.checkpoint_every=100000", "train.progress=false"]


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(variant: str, steps: int, mode: str) -> None:
    from condcomp.config import load_config
    from condcomp.train import Trainer

    low_memory = mode == "low_memory"
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, BASE + VARIANTS[variant] + [f"train.steps={steps}", f"run_dir={tmp}/run",
                                                            f"train.low_memory={str(low_memory).lower()}",
                                                            f"train.fast_allocator={str(mode == 'fast').lower()}"])
        trainer = Trainer(cfg)
        trace, times = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - t0)
            trainer.step += 1
            trace.append(rss_mib())
        trainer.lock.release()
    print(json.dumps({"rss": trace, "step_s": sorted(times)[len(times) // 2]}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--modes", default="default,fast,low_memory",
                   help="allocator settings, comma-separated: default (glibc's), fast (the trainer's default), low_memory")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--child", nargs=3, metavar=("VARIANT", "STEPS", "MODE"))
    args = p.parse_args()
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return
    rows = {}
    for mode in args.modes.split(","):
        for variant in args.variants.split(","):
            out = subprocess.run([sys.executable, __file__, "--child", variant, str(args.steps), mode],
                                 capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            rows[(mode, variant)] = json.loads(out)
            print(f"done {mode} {variant}", file=sys.stderr, flush=True)
    marks = [m for m in (1, 10, 30, args.steps) if m <= args.steps]
    head = (f"{'allocator':10} {'variant':14} {'peak MiB':>9} {'x dense':>8} " +
            " ".join(f"{'@' + str(m):>7}" for m in marks) + f" {'ms/step':>8}")
    print(head + "\n" + "-" * len(head))
    for (mode, variant), r in rows.items():
        peak = max(r["rss"])
        dense_peak = max(rows[(mode, "dense")]["rss"]) if (mode, "dense") in rows else float("nan")
        at = " ".join(f"{r['rss'][m - 1]:>7.0f}" for m in marks)
        print(f"{mode:10} {variant:14} {peak:>9.0f} {peak / dense_peak:>7.2f}x {at} {r['step_s'] * 1e3:>8.1f}")


if __name__ == "__main__":
    main()
