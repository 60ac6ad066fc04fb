"""Long-context attention: dense SDPA, CoLT5 conditional attention, block-sparse, SPLA and linear
attention, side by side on the same input — forward, forward+backward and per-token decode time,
and peak memory, at several lengths and precisions.

    python benchmarks/long_attention.py                       # 4k and 16k, fp32 and bf16
    python benchmarks/long_attention.py --lengths 65536 --skip-dense-backward-above 16384

One attention layer (d_model 512, 8 heads, B 64, k 8 by default), batch 1, projections included.
Times are medians of rounds in which every method runs once in turn (drift hits all alike). Peak
memory is measured in a fresh process per (method, length, precision, phase): the largest resident
set size during one call minus the resident size just before it, so it counts every transient
buffer (score matrices, gathered blocks) as well as what autograd keeps. The last rows give the
plain-GEMM rate measured in the same run, the machine's ceiling for these kernels.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

from condcomp.bench.measure import timed_alternating
from condcomp.layers import Attention, ConditionalAttention, KVCache, SparseLinearAttention
from condcomp.train.optim import autocast

METHODS = ("dense", "colt5", "block_sparse", "spla", "linear")
DECODERS = ("dense", "block_sparse", "spla", "linear")


def build(method: str, *, d_model: int, heads: int, block: int, top_k: int, max_len: int, seed: int = 0):
    torch.manual_seed(seed)
    if method == "dense":
        return Attention(d_model=d_model, n_heads=heads, max_len=max_len)
    if method == "colt5":
        return ConditionalAttention(d_model=d_model, n_heads=heads, max_len=max_len, causal=True)
    kw = dict(d_model=d_model, n_heads=heads, max_len=max_len, block=block, top_k=top_k)
    if method == "block_sparse":
        return SparseLinearAttention(**kw, selection="first_order", residual="none")
    if method == "linear":
        return SparseLinearAttention(**kw, mode="linear")
    return SparseLinearAttention(**kw)


def _input(length: int, d_model: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(1, length, d_model, generator=torch.Generator().manual_seed(seed))


def callables(layer, x: torch.Tensor, precision: str):
    """(forward without grad, forward+backward) closures."""

    def forward():
        with torch.no_grad(), autocast(precision):
            layer(x)

    xg = x.clone().requires_grad_(True)

    def both():
        with autocast(precision):
            y, _ = layer(xg)
        y.float().sum().backward()
        xg.grad = None
        for p in layer.parameters():
            p.grad = None

    return forward, both


def decode_callable(layer, length: int, d_model: int, precision: str):
    """One decoding step on a cache already holding ``length`` tokens of random keys and values
    (filled directly: the step's cost does not depend on how they got there)."""
    hd = layer.head_dim
    g = torch.Generator().manual_seed(2)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    q = torch.randn(1, layer.n_heads, length, hd, generator=g).to(dtype)
    k = torch.randn(1, layer.n_kv_heads, length, hd, generator=g).to(dtype)
    v = torch.randn(1, layer.n_kv_heads, length, hd, generator=g).to(dtype)
    if isinstance(layer, SparseLinearAttention):
        cache = layer.new_cache()
        layer._prefill(q, k, v, cache)
    else:
        cache = KVCache()
        cache.append(k, v)
    x1 = torch.randn(1, 1, d_model, generator=g)

    def step():
        with torch.no_grad(), autocast(precision):
            layer(x1, cache=cache)
        # Stay at the same length (and block position) for every timed step: drop what it appended.
        if isinstance(cache, KVCache):
            cache.size -= 1
        else:
            _rewind(cache)

    return step


def _rewind(cache) -> None:
    cache.size -= 1
    cache.kv.size -= 1
    cache.queries = cache.queries[:, :, :, :-1]


def peak_rss_probe(method: str, length: int, precision: str, phase: str, args) -> float:
    """Run one call in a fresh process; MiB of resident memory above what it held just before."""
    cmd = [sys.executable, __file__, "--probe", method, str(length), precision, phase,
           "--d-model", str(args.d_model), "--heads", str(args.heads), "--block", str(args.block),
           "--top-k", str(args.top_k)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return float(out.strip().splitlines()[-1])


def _probe(method: str, length: int, precision: str, phase: str, args) -> None:
    layer = build(method, d_model=args.d_model, heads=args.heads, block=args.block, top_k=args.top_k, max_len=length + 8)
    if phase == "decode":
        fn = decode_callable(layer, length, args.d_model, precision)
    else:
        forward, both = callables(layer, _input(length, args.d_model), precision)
        fn = forward if phase == "forward" else both
    before = _rss_now()
    fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
    print(max(0.0, peak - before))


def _rss_now() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def gemm_rate(precision: str, n: int = 2048) -> float:
    """GFLOP/s of one n x n x n matmul in this precision: the ceiling the attention kernels share."""
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    sec = timed_alternating({"gemm": lambda: a @ b}, rounds=5)["gemm"]
    return 2 * n**3 / sec / 1e9


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--decode-rounds", type=int, default=50)
    p.add_argument("--skip-dense-backward-above", type=int, default=1 << 30,
                   help="dense/CoLT5 forward+backward only up to this length (it grows quadratically)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    p.add_argument("--json", help="write every measurement here")
    p.add_argument("--probe", nargs=4, metavar=("METHOD", "LENGTH", "PRECISION", "PHASE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        method, length, precision, phase = args.probe
        _probe(method, int(length), precision, phase, args)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; d_model {args.d_model}, {args.heads} heads, "
          f"block {args.block}, top_k {args.top_k}, batch 1")
    rows = []
    for precision in args.precisions:
        rate = gemm_rate(precision)
        print(f"\n{precision}: plain GEMM 2048^3 {rate:.0f} GFLOP/s")
        for length in args.lengths:
            layers = {m: build(m, d_model=args.d_model, heads=args.heads, block=args.block, top_k=args.top_k,
                               max_len=length + 8) for m in args.methods}
            x = _input(length, args.d_model)
            fns = {m: callables(layer, x, precision) for m, layer in layers.items()}
            t0 = time.perf_counter()
            fwd = timed_alternating({m: f for m, (f, _) in fns.items()}, args.rounds)
            quadratic = {"dense", "colt5"}
            both_methods = {m: b for m, (_, b) in fns.items()
                            if m not in quadratic or length <= args.skip_dense_backward_above}
            both = timed_alternating(both_methods, args.rounds)
            dec = timed_alternating({m: decode_callable(layers[m], length, args.d_model, precision)
                                     for m in args.methods if m in DECODERS}, args.decode_rounds)
            for m in args.methods:
                row = dict(method=m, length=length, precision=precision, forward_s=fwd[m], both_s=both.get(m),
                           decode_ms=dec[m] * 1e3 if m in dec else None, gemm_gflops=rate)
                if not args.no_memory:
                    for phase, ok in (("forward", True), ("both", m in both), ("decode", m in dec)):
                        row[f"{phase}_peak_mib"] = peak_rss_probe(m, length, precision, phase, args) if ok else None
                rows.append(row)
            print(f"  {length} tokens ({time.perf_counter() - t0:.0f} s)")
            print(_table([r for r in rows if r["length"] == length and r["precision"] == precision]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


def _table(rows) -> str:
    dense = next((r for r in rows if r["method"] == "dense"), None)

    def fmt(v, unit=""):
        return "—" if v is None else f"{v:.3g}{unit}"

    def ratio(r, key, invert=True):
        if dense is None or r.get(key) is None or dense.get(key) is None:
            return "—"
        return f"{dense[key] / r[key]:.2f}x" if invert else f"{r[key] / dense[key]:.2f}x"

    head = ("| method | forward s | fwd+bwd s | speed-up fwd+bwd | decode ms/token | speed-up decode "
            "| peak MiB fwd | peak MiB fwd+bwd | vs dense | peak MiB decode |")
    lines = [head, "|---" * 10 + "|"]
    for r in rows:
        lines.append(f"| {r['method']} | {fmt(r['forward_s'])} | {fmt(r['both_s'])} | {ratio(r, 'both_s')} | "
                     f"{fmt(r['decode_ms'])} | {ratio(r, 'decode_ms')} | {fmt(r.get('forward_peak_mib'))} | "
                     f"{fmt(r.get('both_peak_mib'))} | {ratio(r, 'both_peak_mib', invert=False)} | "
                     f"{fmt(r.get('decode_peak_mib'))} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
