"""Long-context attention: dense SDPA, block-sparse, SPLA and linear attention side by side on the
same input (forward, forward+backward and per-token decode time, peak memory), plus whole layers
with their projections and CoLT5's conditional attention.

    python benchmarks/long_attention.py                       # 4k and 16k, fp32 and bf16
    python benchmarks/long_attention.py --lengths 65536 --skip-dense-backward-above 16384

Attention core: q, k, v [1, 8, t, 64] in, the attention output out: the part the methods differ
in. Whole layer: d_model 512, 8 heads, projections included, batch 1 (CoLT5 has its own light and
heavy projections and routers, so it is compared here). Decoding: one new token of an attention
layer whose cache already holds t tokens. Defaults: B 64, k 8.
Times are medians of rounds in which every method runs once in turn (drift hits all alike). Peak
memory is measured in a fresh process per (method, length, precision, phase): the largest resident
set size during one call minus the resident size just before it, so it counts every transient
buffer (gathered blocks, states) as well as what autograd keeps. The plain-GEMM rate measured in the
same run is the machine's ceiling for these kernels.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from condcomp.bench.measure import timed_alternating
from condcomp.layers import Attention, ConditionalAttention, KVCache, SparseLinearAttention
from condcomp.layers.sparse_linear_attention import causal_linear_attention, sparse_linear_attention
from condcomp.train.optim import autocast

METHODS = ("dense", "colt5", "block_sparse", "spla", "spla_recompute", "linear")
CORES = ("dense", "block_sparse", "spla", "spla_recompute", "linear")  # CoLT5's attention is not one core: timed as a layer only
DECODERS = CORES


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
    return SparseLinearAttention(**kw, recompute=method == "spla_recompute")


def core(method: str, *, block: int, top_k: int):
    """The attention computation alone, (q [1, h, t, hd], k, v [1, g, t, hd]) -> [1, h, t, hd]:
    what differs between the methods (their projections are the same)."""
    if method == "dense":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    if method == "linear":
        return lambda q, k, v: causal_linear_attention(q, k, v, None, block=block)
    order, log_alpha = (1, None) if method == "block_sparse" else (2, torch.full((q_heads[0],), -4.0))
    return lambda q, k, v: sparse_linear_attention(q, k, v, None, block=block, top_k=top_k, order=order,
                                                   log_alpha=log_alpha, recompute=method == "spla_recompute")


q_heads = [8]


def core_callables(method: str, length: int, args, precision: str):
    """(forward without grad, forward+backward) of the attention core on random rotated q, k, v."""
    fn = core(method, block=args.block, top_k=args.top_k)
    g = torch.Generator().manual_seed(3)
    hd = args.d_model // args.heads
    q, k, v = (torch.randn(1, args.heads, length, hd, generator=g) for _ in range(3))

    def forward():
        with torch.no_grad(), autocast(precision):
            fn(q, k, v)

    leaves = [z.clone().requires_grad_(True) for z in (q, k, v)]

    def both():
        with autocast(precision):
            y = fn(*leaves)
        y.float().sum().backward()
        for z in leaves:
            z.grad = None

    return forward, both


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
    # A fixed mmap threshold makes glibc return every large block to the OS when freed, so the
    # resident size follows live memory instead of the allocator's cache.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env).stdout
    return float(out.strip().splitlines()[-1])


def _probe(method: str, length: int, precision: str, phase: str, args) -> None:
    if phase == "decode":
        layer = build(method, d_model=args.d_model, heads=args.heads, block=args.block, top_k=args.top_k,
                      max_len=length + 8)
        fn = decode_callable(layer, length, args.d_model, precision)
    else:  # the attention core, as timed
        forward, both = core_callables(method, length, args, precision)
        fn = forward if phase == "forward" else both
    fn()  # warm-up: one-time allocations (thread pools, kernels' scratch) are not the method's
    before = _status_mib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # Linux: reset the peak resident size (VmHWM) to now
        f.write("5")
    fn()
    print(max(0.0, _status_mib("VmHWM") - before))


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB -> MiB
    raise RuntimeError(f"{field} not in /proc/self/status")


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
                   help="dense forward+backward only up to this length (it grows quadratically)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    p.add_argument("--layers-up-to", type=int, default=16384,
                   help="also time whole layers (projections, CoLT5) up to this length")
    p.add_argument("--json", help="write every measurement here")
    p.add_argument("--probe", nargs=4, metavar=("METHOD", "LENGTH", "PRECISION", "PHASE"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        method, length, precision, phase = args.probe
        _probe(method, int(length), precision, phase, args)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; d_model {args.d_model}, {args.heads} heads, "
          f"block {args.block}, top_k {args.top_k}, batch 1")
    q_heads[0] = args.heads
    rows, layer_rows = [], []
    for precision in args.precisions:
        rate = gemm_rate(precision)
        print(f"\n{precision}: plain GEMM 2048^3 {rate:.0f} GFLOP/s")
        for length in args.lengths:
            t0 = time.perf_counter()
            cores = [m for m in args.methods if m in CORES]
            fns = {m: core_callables(m, length, args, precision) for m in cores}
            big = length > args.skip_dense_backward_above
            fwd = timed_alternating({m: f for m, (f, _) in fns.items()}, args.rounds)
            both = timed_alternating({m: b for m, (_, b) in fns.items() if not (big and m == "dense")}, args.rounds)
            layers = {m: build(m, d_model=args.d_model, heads=args.heads, block=args.block, top_k=args.top_k,
                               max_len=length + 8) for m in args.methods}
            dec = timed_alternating({m: decode_callable(layers[m], length, args.d_model, precision)
                                     for m in cores}, args.decode_rounds)
            for m in cores:
                row = dict(method=m, length=length, precision=precision, forward_s=fwd[m], both_s=both.get(m),
                           decode_ms=dec[m] * 1e3, gemm_gflops=rate)
                if not args.no_memory:
                    for phase, ok in (("forward", True), ("both", m in both), ("decode", True)):
                        row[f"{phase}_peak_mib"] = peak_rss_probe(m, length, precision, phase, args) if ok else None
                rows.append(row)
            print(f"  {length} tokens, attention core ({time.perf_counter() - t0:.0f} s)")
            print(_table([r for r in rows if r["length"] == length and r["precision"] == precision]))
            if length <= args.layers_up_to:
                x = _input(length, args.d_model)
                lfns = {m: callables(layer, x, precision) for m, layer in layers.items()}
                lboth = timed_alternating({m: b for m, (_, b) in lfns.items()}, args.rounds)
                for m in args.methods:
                    layer_rows.append(dict(method=m, length=length, precision=precision, both_s=lboth[m]))
                dense = lboth.get("dense")
                print(f"  {length} tokens, whole layer (projections included), forward+backward s: "
                      + ", ".join(f"{m} {t:.3g}" + (f" ({dense / t:.2f}x)" if dense else "") for m, t in lboth.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"core": rows, "layer": layer_rows}, f, indent=1)


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
