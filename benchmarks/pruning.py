"""Decode and prefill speed of SmolLM2-135M with its FFN channels physically pruned, against the dense
model: the speed half of the pruning issue. The channels here are chosen by magnitude, since speed
depends only on how many are kept. An input-conditioned model compacted for one prompt has the same
shapes, so this is its decode speed too, not counting the predictor.

Greedy decode with a KV cache (batch 1, a 64-token prompt, 256 new tokens) and prefill of 512 tokens
(batch 1), fp32 and bf16 autocast. Models are timed alternately round by round; medians, and each
model's time over the dense one's.

    python benchmarks/pruning.py [--rounds 5 --sparsities 0.5,0.75]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from condcomp.convert.hf import from_hf
from condcomp.convert.prune import magnitude_masks, prune_ffn_channels
from condcomp.train.optim import autocast


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sparsities", default="0.5,0.75")
    p.add_argument("--new-tokens", type=int, default=256)
    args = p.parse_args()
    dense, _ = from_hf("smollm2", seq_len=1024)
    models = {"dense": dense}
    for sp in (float(s) for s in args.sparsities.split(",")):
        models[f"FFN {sp:.0%} pruned"] = prune_ffn_channels(dense, magnitude_masks(dense, sp)).eval()
    torch.manual_seed(0)
    prompt = torch.randint(0, 49152, (1, 64))
    long = torch.randint(0, 49152, (1, 512))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; SmolLM2-135M (d_ff 1536), batch 1\n")
    print("| model | d_ff | params | precision | decode tok/s | x dense | prefill 512 ms | x dense |")
    print("|---|---:|---:|---|---:|---:|---:|---:|")
    for precision in ("fp32", "bf16"):
        decode = {name: [] for name in models}
        prefill = {name: [] for name in models}
        for _ in range(args.rounds):
            for name, m in models.items():
                with torch.no_grad(), autocast(precision):
                    decode[name].append(_time(lambda: m.generate(prompt, args.new_tokens, temperature=0)))
                    prefill[name].append(_time(lambda: m(long, last_only=True)))
        d0, p0 = statistics.median(decode["dense"]), statistics.median(prefill["dense"])
        for name, m in models.items():
            d, pf = statistics.median(decode[name]), statistics.median(prefill[name])
            params = sum(x.numel() for x in m.parameters())
            print(f"| {name} | {m.cfg.ffn_hidden} | {params / 1e6:.1f}M | {precision} | {args.new_tokens / d:.1f} | "
                  f"{d0 / d:.2f}x | {pf * 1e3:.0f} | {p0 / pf:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
