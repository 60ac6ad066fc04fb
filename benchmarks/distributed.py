"""MoE language-model training on 1 vs 2 ranks of this machine: tokens/s, and where the step time goes.

Every row is a real ``torchrun`` job running the Trainer's own step (DDP, expert-parallel exchange,
gradient reduction, clipping, AdamW) on the built-in corpus; the rows differ only in how the machine's
cores are split between ranks and threads. The breakdown comes from torch.profiler over a few extra
steps:
- "all-to-all, blocking" sums the gloo all-to-all collectives (the expert exchanges, forward and
  backward, and the per-expert counts). The training thread waits for each one, so this time is on the
  step's critical path; it includes waiting for the other rank to arrive.
- "all-reduce in flight" sums the gloo all-reduces (DDP's gradient buckets, the small scalar
  reductions). DDP launches the buckets during backward and they overlap the remaining backward
  compute, so this is time in flight, not time added to the step.

    .venv/bin/python benchmarks/distributed.py [--rounds 3] [--steps 15] [--d-model 256] [--precision bf16]

``--sharding`` measures memory instead: a dense model as large as 4 DDP ranks of this machine hold,
trained on 1, 2 and 4 ranks with DDP (every rank holds the whole training state) and with FSDP
(``train.fsdp``: parameters, gradients and AdamW state sharded). Each row reports the training state
one rank holds (parameters + gradients + AdamW moments, counted from its tensors), that rank's peak
resident memory (``ru_maxrss``, the largest rank's) and tokens/s.

    .venv/bin/python benchmarks/distributed.py --sharding [--d-model 1024] [--layers 12]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SETUPS = [  # (label, ranks, threads per rank, expert_parallel)
    ("1 rank x 2 threads", 1, 2, 1),
    ("1 rank x 1 thread", 1, 1, 1),
    ("2 ranks x 1 thread, data parallel", 2, 1, 1),
    ("2 ranks x 1 thread, experts over 2", 2, 1, 2),
]


SHARDING_SETUPS = [  # (label, ranks, fsdp)
    ("1 rank", 1, False),
    ("2 ranks, DDP", 2, False),
    ("2 ranks, FSDP", 2, True),
    ("4 ranks, DDP", 4, False),
    ("4 ranks, FSDP", 4, True),
]


def sharding_overrides(args) -> list[str]:
    return [f"model.d_model={args.d_model}", f"model.n_layers={args.layers}", f"model.n_heads={args.d_model // 64}",
            f"model.seq_len={args.seq_len}", f"train.batch_size={args.batch}", f"train.precision={args.precision}",
            "train.progress=false", "train.warmup_steps=10", f"train.steps={10 * args.steps}"]


def model_overrides(args) -> list[str]:
    return [f"model.d_model={args.d_model}", "model.n_layers=4", "model.n_heads=4", f"model.seq_len={args.seq_len}",
            "model.ffn=moe", "model.moe.num_experts=8", "model.moe.k=2", "model.moe.capacity_factor=1.25",
            f"model.moe.d_ff={2 * args.d_model}", "model.moe.moe_every=1", f"train.batch_size={args.batch}",
            f"train.precision={args.precision}", "train.progress=false", "train.warmup_steps=10",
            f"train.steps={10 * args.steps}"]


def worker(args) -> None:
    """One rank of a benchmark job (run under torchrun)."""
    from torch.profiler import ProfilerActivity, profile

    from condcomp.config import load_config
    from condcomp.distributed import shutdown
    from condcomp.train import Trainer

    run_dir = Path(args.out).with_suffix("")  # unique per job, created by the launcher's temp folder
    if args.sharding:
        overrides = sharding_overrides(args) + [f"train.fsdp={args.fsdp}"]
    else:
        overrides = model_overrides(args) + [f"train.expert_parallel={args.ep}"]
    cfg = load_config(None, overrides + [f"train.threads={args.threads}", f"run_dir={run_dir}"])
    trainer = Trainer(cfg)
    rt = trainer.rt
    for _ in range(args.warmup):
        trainer.train_step()
        trainer.step += 1
    rt.barrier()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        trainer.train_step()
        trainer.step += 1
    rt.barrier()
    seconds = time.perf_counter() - t0
    if args.sharding:
        from condcomp.train.trainer import peak_rss_bytes

        peak = rt.all_reduce(peak_rss_bytes() / 2**30, "max")
        result = {"tokens_per_s": cfg.train.batch_size * cfg.model.seq_len * args.steps / seconds,
                  "step_s": seconds / args.steps, "peak_rss_gib": peak, "parameters": trainer.model.num_parameters(),
                  **trainer.state_memory}
        if rt.is_main:
            Path(args.out).write_text(json.dumps(result))
        shutdown()  # waits for every rank first: a rank leaving early makes gloo abort its peer
        return
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.profile_steps):
            trainer.train_step()
            trainer.step += 1
    collective = {"all_to_all": 0.0, "all_reduce": 0.0}
    for event in prof.events():
        for kind in collective:
            if event.name == f"gloo:{kind}":
                collective[kind] += event.cpu_time_total / 1e6
    step_s = seconds / args.steps
    result = {"tokens_per_s": cfg.train.batch_size * cfg.model.seq_len * args.steps / seconds, "step_s": step_s,
              **{f"{k}_s_per_step": v / args.profile_steps for k, v in collective.items()}}
    if rt.is_main:
        Path(args.out).write_text(json.dumps(result))
    shutdown()


def launch(args, label: str, ranks: int, threads: int, ep: int, folder: Path, fsdp: bool = False) -> dict:
    out = folder / f"{ranks}r{threads}t{ep}e{int(fsdp)}f.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
           __file__, "--worker", "--out", str(out), "--threads", str(threads), "--ep", str(ep),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--profile-steps", str(args.profile_steps),
           "--d-model", str(args.d_model), "--seq-len", str(args.seq_len), "--batch", str(args.batch),
           "--precision", args.precision, "--layers", str(args.layers), "--fsdp", str(fsdp).lower()]
    if args.sharding:
        cmd.append("--sharding")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    # gloo occasionally aborts a rank in interpreter teardown ("terminate called without an active
    # exception"), after the process group was left; rank 0 wrote the result only once every rank had
    # finished its steps, so such a job's numbers stand.
    teardown_abort = "terminate called without an active exception" in done.stderr and out.is_file()
    if done.returncode and not teardown_abort:
        raise SystemExit(f"{label} failed:\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=15, help="timed steps per launch")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--profile-steps", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="times each setup is launched (medians reported)")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16, help="sequences per step over all ranks")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--sharding", action="store_true", help="the DDP vs FSDP memory table instead")
    p.add_argument("--layers", type=int, default=12, help="--sharding: the dense model's layers")
    p.add_argument("--fsdp", default="false", help=argparse.SUPPRESS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--ep", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.sharding:
        return sharding_table(args)
    print(f"MoE LM (d_model {args.d_model}, 4 layers, 8 experts top-2, capacity 1.25), batch {args.batch} x "
          f"{args.seq_len} tokens, {args.precision}; {args.steps} timed steps per row, {os.cpu_count()} CPU cores")
    # Rounds cycle through the setups so that a slow spell of the machine hits every setup alike;
    # the table shows medians over rounds and the range of tokens/s.
    runs: dict[str, list[dict]] = {label: [] for label, *_ in SETUPS}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for label, ranks, threads, ep in SETUPS:
                runs[label].append(launch(args, label, ranks, threads, ep, Path(tmp)))
            print(f"  round {round_ + 1}/{args.rounds}: " + ", ".join(
                f"{label.split(',')[-1].strip()} {runs[label][-1]['tokens_per_s']:,.0f}" for label, *_ in SETUPS),
                flush=True)
    med = {label: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for label, rs in runs.items()}
    base = med[SETUPS[0][0]]["tokens_per_s"]
    print()
    print("| setup | tokens/s (median) | range over rounds | vs 1 rank x 2 threads | step (ms) | "
          "all-to-all, blocking (ms/step) | all-reduce in flight (ms/step) |")
    print("|---|---|---|---|---|---|---|")
    for label, r in med.items():
        lo, hi = min(x["tokens_per_s"] for x in runs[label]), max(x["tokens_per_s"] for x in runs[label])
        print(f"| {label} | {r['tokens_per_s']:,.0f} | {lo:,.0f}-{hi:,.0f} | {r['tokens_per_s'] / base:.2f}x | "
              f"{1e3 * r['step_s']:.0f} | {1e3 * r['all_to_all_s_per_step']:.1f} | "
              f"{1e3 * r['all_reduce_s_per_step']:.1f} |")


def sharding_table(args) -> None:
    """Per-rank memory and speed of DDP vs FSDP on 1, 2 and 4 ranks (each rank one thread, as
    torchrun sets; 4 ranks share the 2 cores, so speed cannot scale here: memory must)."""
    print(f"dense LM, d_model {args.d_model}, {args.layers} layers, batch {args.batch} x {args.seq_len} tokens, "
          f"{args.precision}; {args.steps} timed steps per row, {os.cpu_count()} CPU cores")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for label, ranks, fsdp in SHARDING_SETUPS:
                rows.setdefault(label, []).append(launch(args, label, ranks, 1, 1, Path(tmp), fsdp))
                print(f"  round {round_ + 1}: {label}: {rows[label][-1]['state_gib']:.2f} GiB state, "
                      f"{rows[label][-1]['peak_rss_gib']:.2f} GiB peak RSS, "
                      f"{rows[label][-1]['tokens_per_s']:,.0f} tokens/s", flush=True)
    med = {label: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for label, rs in rows.items()}
    base = med[SHARDING_SETUPS[0][0]]
    print(f"\n{base['parameters'] / 1e6:,.0f} M parameters; medians over {args.rounds} round(s)\n")
    print("| setup | training state per rank (GiB) | vs 1 rank | peak RSS per rank (GiB) | vs 1 rank | tokens/s |")
    print("|---|---|---|---|---|---|")
    for label, r in med.items():
        print(f"| {label} | {r['state_gib']:.2f} | {r['state_gib'] / base['state_gib']:.2f}x | "
              f"{r['peak_rss_gib']:.2f} | {r['peak_rss_gib'] / base['peak_rss_gib']:.2f}x | {r['tokens_per_s']:,.0f} |")


if __name__ == "__main__":
    main()
