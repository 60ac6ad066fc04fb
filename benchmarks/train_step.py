"""Training-step throughput of the dense Transformer against this machine's matmul peak.

Prints one table: tokens/s and achieved GFLOP/s (FLOPs counted by torch.utils.flop_counter on a
real step: forward, backward and optimizer) at d_model 256 and 512, fp32 and bf16, next to the peak
GFLOP/s of a large GEMM measured in the same run.

    .venv/bin/python benchmarks/train_step.py [--layers 4 --seq 256 --batch 16]
"""

from __future__ import annotations

import argparse

import torch
import torch.utils.benchmark as tb

from condcomp.config import ModelConfig, TrainConfig
from condcomp.flops import flop_counter
from condcomp.models import Transformer
from condcomp.train.allocator import tune_for_speed
from condcomp.train.optim import autocast, build_optimizer
from condcomp.train.trainer import lm_loss


def gemm_peak(dtype: torch.dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    t = tb.Timer("a @ b", globals={"a": a, "b": b}, num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=2.0)
    return 2 * n**3 / t.median / 1e9


def step_fn(model, opt, x, y, precision):
    def step():
        with autocast(precision):
            loss = lm_loss(model(x).logits, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--min-run-time", type=float, default=5.0)
    p.add_argument("--allocator", choices=("fast", "glibc"), default="fast",
                   help="fast: the trainer's default (train.fast_allocator); glibc: glibc's own defaults")
    args = p.parse_args()
    fast_allocator = args.allocator == "fast" and tune_for_speed()
    torch.manual_seed(0)
    peaks = {"fp32": gemm_peak(torch.float32), "bf16": gemm_peak(torch.bfloat16)}
    print(f"threads {torch.get_num_threads()}, torch {torch.__version__}; "
          f"GEMM 2048^3 peak: fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s; "
          f"allocator: {'the trainer default (fast)' if fast_allocator else 'glibc default'}")
    print(f"model: {args.layers} layers, SwiGLU, seq {args.seq}, batch {args.batch} "
          f"({args.seq * args.batch} tokens/step)\n")
    header = f"{'d_model':>7} {'prec':>5} {'params':>8} {'ms/step':>8} {'tokens/s':>9} {'GFLOP/step':>10} {'GFLOP/s':>8} {'% peak':>7} {'vs fp32':>8}"
    print(header)
    print("-" * len(header))
    for d in (256, 512):
        base_time = None
        for precision in ("fp32", "bf16"):
            cfg = ModelConfig(d_model=d, n_layers=args.layers, n_heads=d // 64, seq_len=args.seq)
            model = Transformer(cfg)
            tc = TrainConfig()
            opt = build_optimizer(model, lr=tc.lr, weight_decay=tc.weight_decay, betas=(tc.beta1, tc.beta2))
            x = torch.randint(0, 256, (args.batch, args.seq))
            y = torch.randint(0, 256, (args.batch, args.seq))
            step = step_fn(model, opt, x, y, precision)
            step()  # warm-up: allocates optimizer state
            with flop_counter() as fc:
                step()
            flops = fc.get_total_flops()
            t = tb.Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads()).blocked_autorange(min_run_time=args.min_run_time).median
            base_time = base_time or t
            gflops = flops / t / 1e9
            print(f"{d:>7} {precision:>5} {model.num_parameters() / 1e6:>7.2f}M {t * 1e3:>8.1f} "
                  f"{args.seq * args.batch / t:>9,.0f} {flops / 1e9:>10.1f} {gflops:>8.1f} "
                  f"{100 * gflops / peaks[precision]:>6.1f}% {base_time / t:>7.2f}x")


if __name__ == "__main__":
    main()
