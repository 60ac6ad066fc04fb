"""Causal self-attention kernels on CPU: PyTorch's SDPA (flash) against the materialized form
(``condcomp.layers.sdpa.MaterializedAttention``) and the plain autograd composition, by sequence
length and precision, forward and forward+backward.

Prints one table; 4,096 tokens per call (batch = 4096 / seq), 4 heads of 64. Rows of one shape are
timed alternately over several rounds (medians), so their ratios come from the same conditions.
The "used" column says where ``condcomp.layers.sdpa.attention`` picks the row's kernel: for training
(forward+backward) and for inference (forward alone).

    .venv/bin/python -u benchmarks/attention_kernels.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F
import torch.utils.benchmark as tb

from condcomp.layers.sdpa import MaterializedAttention, uses_materialized
from condcomp.train.allocator import tune_for_speed


def eager(q, k, v):
    """What a user writes by hand: scores, mask, fp32 softmax, probabilities times values."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(torch.ones(scores.shape[-2:], dtype=torch.bool).triu(1), float("-inf"))
    return torch.softmax(scores.float(), -1).to(q.dtype) @ v


KERNELS = {
    "sdpa (flash)": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
    "materialized": lambda q, k, v: MaterializedAttention.apply(q, k, v, True, None),
    "eager": eager,
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--min-run-time", type=float, default=0.4)
    args = p.parse_args()
    heads, head_dim = 4, 64
    fast_allocator = tune_for_speed()  # as the trainer does by default (train.fast_allocator)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; causal, {args.tokens} tokens, "
          f"{heads} heads of {head_dim}; ms (median of {args.rounds} alternating rounds); "
          f"allocator: {'the trainer default (fast)' if fast_allocator else 'glibc default'}\n")
    header = f"{'prec':>5} {'seq':>5} {'kernel':>14} {'fwd ms':>8} {'fwd+bwd ms':>11} {'vs sdpa':>8}  used"
    print(header)
    print("-" * len(header))
    for dtype in (torch.float32, torch.bfloat16):
        for seq in (64, 128, 256, 512, 1024):
            batch = max(1, args.tokens // seq)
            g = torch.Generator().manual_seed(0)
            q, k, v = [torch.randn(batch, heads, seq, head_dim, generator=g).to(dtype).requires_grad_() for _ in range(3)]
            grad = torch.randn(batch, heads, seq, head_dim, generator=g).to(dtype)

            def timer(fn, backward):
                def run():
                    if backward:
                        fn(q, k, v).backward(grad)
                    else:
                        with torch.no_grad():
                            fn(q, k, v)
                return tb.Timer("run()", globals={"run": run}, num_threads=torch.get_num_threads())

            times = {(name, bwd): [] for name in KERNELS for bwd in (False, True)}
            for _ in range(args.rounds):
                for (name, bwd), samples in times.items():
                    samples.append(timer(KERNELS[name], bwd).blocked_autorange(min_run_time=args.min_run_time).median)
            med = {key: statistics.median(s) * 1e3 for key, s in times.items()}
            chosen = {phase: "materialized" if uses_materialized(q, k, backward=phase == "train") else "sdpa (flash)"
                      for phase in ("train", "infer")}
            prec = "bf16" if dtype == torch.bfloat16 else "fp32"
            for name in KERNELS:
                ratio = med[("sdpa (flash)", True)] / med[(name, True)]
                mark = " ".join(phase for phase, kernel in chosen.items() if kernel == name)
                print(f"{prec:>5} {seq:>5} {name:>14} {med[(name, False)]:>8.1f} {med[(name, True)]:>11.1f} {ratio:>7.2f}x  {mark}")
        print()
    print("vs sdpa: the flash kernel's forward+backward time over the row's (above 1 = faster than sdpa).")


if __name__ == "__main__":
    main()
