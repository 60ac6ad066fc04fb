"""SRU against torch.nn.LSTM / GRU (and the `sru` package when installed), ratios in one run.

seq 256 and 1024, batch 16, 256 -> 256, 2 layers. Forward (no grad) and forward+backward, each
model in fp32 and under bf16 autocast (SRU's projection runs in bf16 and its recurrence stays
fp32; nn.LSTM / nn.GRU run their whole fused kernel in bf16). Ratios are against fp32 nn.LSTM.
Goal: SRU forward+backward >= 3x faster than nn.LSTM at both lengths; time and activation memory
linear in the sequence length; activation memory no more than nn.LSTM's.

SRU rows: the compiled kernel (the default on CPU in float32, built before timing) and the PyTorch
fused path it replaced (sru_recurrence.NATIVE = "never"). The physical limit printed under each
table is SRU's matmul FLOPs (its input projections, forward and backward) at the plain-GEMM rate
measured in the same run: no SRU implementation can be faster than that.

Activation memory = bytes autograd saves for backward plus the output (condcomp.bench.saved_bytes).
nn.LSTM / nn.GRU on CPU save through their own fused kernels, which the hook also sees.
Rows are timed alternately, one call each per round (median of --rounds).

    .venv/bin/python -u benchmarks/recurrence.py [--rounds 5 --lengths 256 1024]
"""

from __future__ import annotations

import argparse
import importlib.util

import torch
from torch import nn

from condcomp.bench import parameter_storages, saved_bytes
from condcomp.bench.measure import gemm_rate, timed_alternating
import condcomp.layers.sru_recurrence as sru_recurrence
from condcomp.layers import SRU, sru_native
from condcomp.train.allocator import tune_for_speed

KERNEL, PYTORCH = "condcomp SRU (compiled kernel)", "condcomp SRU (PyTorch fused)"


def models(d: int, layers: int) -> dict[str, tuple[nn.Module, bool]]:
    """name -> (module, bf16 autocast)."""
    sru, lstm, gru = SRU(d, d, layers), nn.LSTM(d, d, layers), nn.GRU(d, d, layers)
    rows = {}
    if sru_native.kernel() is not None:                     # built now, before any timing
        rows |= {KERNEL: (sru, False), f"{KERNEL}, bf16": (sru, True)}
    rows |= {PYTORCH: (sru, False), f"{PYTORCH}, bf16": (sru, True),
             "condcomp SRU (reference loop)": (SRU(d, d, layers, fast=False), False),
             "torch.nn.LSTM": (lstm, False), "torch.nn.LSTM, bf16": (lstm, True),
             "torch.nn.GRU": (gru, False), "torch.nn.GRU, bf16": (gru, True)}
    if importlib.util.find_spec("sru") is not None:
        import sru as sru_package  # noqa: PLC0415 - optional peer; compiles its own extension when imported

        rows["sru package"] = (sru_package.SRU(d, d, num_layers=layers), False)
        rows["sru package, bf16"] = (rows["sru package"][0], True)
    return rows


def backend(name: str):
    """The recurrence backend a row runs: PyTorch rows switch the compiled kernel off."""
    return "never" if name.startswith(PYTORCH) else "auto"


def sru_matmul_flops(t: int, batch: int, d: int, layers: int) -> float:
    """SRU's matmul FLOPs for forward+backward: per layer one d -> 3d projection of every token,
    whose backward costs two more matmuls of the same size."""
    return 3 * layers * 2 * t * batch * d * 3 * d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reference-max-len", type=int, default=256,
                   help="time the autograd reference loop only up to this length (it is slow: it is what the "
                        "fused path replaces)")
    p.add_argument("--allocator", choices=("fast", "glibc"), default="fast",
                   help="fast: the trainer's default (train.fast_allocator); glibc: glibc's own defaults")
    args = p.parse_args()
    fast_allocator = args.allocator == "fast" and tune_for_speed()
    torch.manual_seed(0)
    all_rows = models(args.d, args.layers)
    params = parameter_storages(m for m, _ in all_rows.values())
    print(f"threads {torch.get_num_threads()}, batch {args.batch}, {args.d} -> {args.d}, {args.layers} layers; "
          f"allocator: {'the trainer default (fast)' if fast_allocator else 'glibc default'}\n")
    results = {}
    for t in args.lengths:
        rows = {n: mb for n, mb in all_rows.items() if "reference" not in n or t <= args.reference_max_len}
        x = torch.randn(t, args.batch, args.d)
        xg = x.clone().requires_grad_(True)

        def fwd(name, m, bf16):
            def run():
                sru_recurrence.NATIVE = backend(name)
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    m(x)
            return run

        def both(name, m, bf16):
            def run():
                sru_recurrence.NATIVE = backend(name)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    out = m(xg)[0]
                out.float().sum().backward()
            return run

        def saved(name, m, bf16):
            def run():
                sru_recurrence.NATIVE = backend(name)
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    return m(xg)[0]
            return saved_bytes(run, params)

        failed = {}
        for n, mb in rows.items():  # a peer that cannot run a setting gets a note, not a row
            try:
                fwd(n, *mb)()
                both(n, *mb)()
            except RuntimeError as e:
                failed[n] = str(e).strip().splitlines()[-1][:120]
        rows = {n: mb for n, mb in rows.items() if n not in failed}
        rates = {"fp32": gemm_rate(torch.float32), "bf16": gemm_rate(torch.bfloat16)}
        f = timed_alternating({n: fwd(n, *mb) for n, mb in rows.items()}, args.rounds)
        fb = timed_alternating({n: both(n, *mb) for n, mb in rows.items()}, args.rounds)
        mem = {n: saved(n, *mb) for n, mb in rows.items()}
        sru_recurrence.NATIVE = "auto"
        results[t] = (f, fb, mem)
        lstm = "torch.nn.LSTM"
        print(f"seq {t}")
        print("| model | fwd ms | LSTM / this | fwd+bwd ms | LSTM / this | act MiB | this / LSTM |")
        print("|---|---|---|---|---|---|---|")
        for n in rows:
            print(f"| {n} | {f[n] * 1e3:.1f} | {f[lstm] / f[n]:.2f}x | {fb[n] * 1e3:.1f} | {fb[lstm] / fb[n]:.2f}x | "
                  f"{mem[n] / 2**20:.1f} | {mem[n] / mem[lstm]:.2f}x |")
        for n, why in failed.items():
            print(f"({n}: fails: {why})")
        flops = sru_matmul_flops(t, args.batch, args.d, args.layers)
        for kind, rate in rates.items():
            floor = flops / rate
            print(f"physical limit, {kind}: SRU's {flops / 1e9:.2f} GFLOP of matmuls at the plain-GEMM rate "
                  f"({rate / 1e9:.0f} GFLOP/s, same run) take {floor * 1e3:.1f} ms fwd+bwd = "
                  f"{fb[lstm] / floor:.2f}x faster than fp32 nn.LSTM at best")
        print(flush=True)
    if len(args.lengths) > 1:
        a, b = args.lengths[0], args.lengths[-1]
        print(f"growth from seq {a} to {b} (x{b / a:g} tokens): fwd+bwd time, activation memory")
        for n in all_rows:
            if n not in results[a][1] or n not in results[b][1]:
                continue
            print(f"  {n:34} {results[b][1][n] / results[a][1][n]:5.2f}x  {results[b][2][n] / results[a][2][n]:5.2f}x")


if __name__ == "__main__":
    main()
