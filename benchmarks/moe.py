"""MoE layer forward+backward against the physical limit and against the peers, on CPU.

The limit is the rate of one plain GEMM (2048³, this dtype), timed as a row of each group, alternately
with the group's other rows. Each MoE row
reports its expert FLOPs per second (forward + backward of the expert GEMMs only: 3 x 2 x assignments
x the expert's weights) and that rate as a fraction of the plain GEMM's. Besides condcomp's layer,
each router's group shows what the same expert GEMMs cost on exactly its loads, with no routing,
gather or scatter:
- "old ideal": a loop of ``x[s:e] @ w[g]`` over slices, indexing the weight bank per expert (its
  backward zero-fills a whole-bank gradient per expert);
- "split/unbind loop": ``x.split(sizes)`` with ``w.unbind(0)``;
- "grouped_mm": ``torch.nn.functional.grouped_mm`` (one call per weight).
Peers run top-2 dropless SwiGLU on the same weights and the same loads: HF transformers' Mixtral
sparse block with each expert backend that runs on CPU (``batched_mm`` materialises per-token
weights and is skipped), and st-moe-pytorch where installed (its own routing and capacity). All rows
of a group are timed alternately, round by round, in one run (medians).

    .venv/bin/python -u benchmarks/moe.py [--tokens 4096 --d-model 512 --d-ff 1024 --experts 8 --rounds 9]
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from condcomp.bench.measure import timed_alternating
from condcomp.layers.expert_loop import activate as _activate
from condcomp.layers.moe import MoE
from condcomp.routing import ExpertChoiceRouter, TopKRouter
from condcomp.train.allocator import tune_for_speed
from condcomp.train.optim import autocast

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def expert_flops(assignments: int, d: int, dff: int) -> float:
    """Forward+backward FLOPs of SwiGLU expert GEMMs (up: d x 2 d_ff, down: d_ff x d)."""
    return 3 * 2 * assignments * (d * 2 * dff + dff * d)


def step_fn(forward, x: torch.Tensor, precision: str):
    """forward(x) then backward of a fixed random gradient, under the trainer's autocast."""
    xg = x.detach().requires_grad_(True)
    with autocast(precision):
        grad = torch.randn_like(forward(xg))

    def run():
        with autocast(precision):
            y = forward(xg)
        y.backward(grad)
    return run


def ideals(moe: MoE, xs: torch.Tensor, sizes: list[int], precision: str) -> dict:
    """The same expert GEMMs on pre-grouped rows, three ways (module docstring)."""
    up, down, act = moe.experts.up, moe.experts.down, moe.experts.activation
    starts = [sum(sizes[:g]) for g in range(len(sizes))]
    offsets = torch.tensor(sizes).cumsum(0).to(torch.int32)

    def old(x):
        return torch.cat([_activate(x[s:s + n] @ up[g], act) @ down[g] for g, (s, n) in enumerate(zip(starts, sizes))
                          if n])

    def split(x):
        ups, downs = up.unbind(0), down.unbind(0)
        return torch.cat([_activate(c @ ups[g], act) @ downs[g] for g, c in enumerate(x.split(sizes)) if c.shape[0]])

    def grouped(x):
        dtype = torch.bfloat16 if precision == "bf16" else x.dtype
        with torch.autocast("cpu", enabled=False):
            h = _activate(_grouped_mm(x.to(dtype), up.to(dtype), offs=offsets), act)
            return _grouped_mm(h, down.to(dtype), offs=offsets)

    rows = {"old ideal (slices of the bank)": step_fn(old, xs, precision),
            "split/unbind loop": step_fn(split, xs, precision)}
    if _grouped_mm is not None:
        rows["grouped_mm"] = step_fn(grouped, xs, precision)
    return rows


def hf_peers(moe: MoE, x: torch.Tensor, precision: str) -> dict:
    """HF Mixtral blocks holding moe's weights (so the same routing and loads), one per CPU backend."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        print("(transformers not installed: no HF rows)")
        return {}
    e, d, dff = moe.experts.num_experts, moe.experts.d_model, moe.experts.d_ff
    rows = {}
    for backend in ("eager", "grouped_mm"):
        cfg = MixtralConfig(hidden_size=d, intermediate_size=dff, num_local_experts=e, num_experts_per_tok=2,
                            experts_implementation=backend)
        hf = MixtralSparseMoeBlock(cfg)
        with torch.no_grad():  # created uninitialised outside from_pretrained: copy ours in
            hf.gate.weight.copy_(moe.router.gate.weight)
            hf.experts.gate_up_proj.copy_(moe.experts.up.transpose(1, 2))
            hf.experts.down_proj.copy_(moe.experts.down.transpose(1, 2))
        rows[f"HF Mixtral {backend}"] = step_fn(lambda t, m=hf: m(t), x, precision)
    return rows


def st_moe_peer(d: int, dff: int, e: int, x: torch.Tensor, precision: str) -> dict:
    try:
        from st_moe_pytorch import MoE as STMoE
    except ImportError:
        print("(st-moe-pytorch not installed: no row; pip install -e '.[peers]')")
        return {}
    st = STMoE(dim=d, num_experts=e, expert_hidden_mult=max(1, dff // d), gating_top_n=2, capacity_factor_train=1.25,
               threshold_train=0.0)
    return {"st-moe-pytorch top-2 (its routing, CF 1.25)": step_fn(lambda t: st(t)[0], x, precision)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=1024)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--groups", default="top-1,top-2,ec,fine,peers")
    args = p.parse_args()
    fast_allocator = tune_for_speed()  # as the trainer does by default (train.fast_allocator)
    torch.manual_seed(0)
    d, dff, e, n = args.d_model, args.d_ff, args.experts, args.tokens
    x = torch.randn(8, n // 8, d)
    configs = {
        "top-1": ("top-1 CF 1.25", dff, e, lambda: TopKRouter(d_model=d, num_experts=e, k=1, capacity_factor=1.25)),
        "top-2": ("top-2 CF 1.25", dff, e, lambda: TopKRouter(d_model=d, num_experts=e, k=2, capacity_factor=1.25)),
        "ec": ("expert choice CF 2 per-position", dff, e,
               lambda: ExpertChoiceRouter(d_model=d, num_experts=e, capacity_factor=2.0, mode="per_position")),
        "fine": ("top-8 of 64 dropless (d_ff 256)", 256, 64,
                 lambda: TopKRouter(d_model=d, num_experts=64, k=8, capacity_factor=None)),
        "peers": ("top-2 dropless, peers", dff, e, lambda: TopKRouter(d_model=d, num_experts=e, k=2,
                                                                        capacity_factor=None)),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {n} tokens, d_model {d}, SwiGLU experts "
          f"(d_ff {dff}, {e} experts unless noted); forward+backward; "
          f"allocator: {'the trainer default (fast)' if fast_allocator else 'glibc default'}")
    for precision in args.dtypes.split(","):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        plain_a, plain_b = torch.randn(2048, 2048, dtype=dtype), torch.randn(2048, 2048, dtype=dtype)
        print(f"\n{precision}: each group's \"x plain\" is against its own plain 2048³ GEMM row, timed "
              f"alternately with the group's rows")
        head = f"{'group':34} {'row':44} {'ms':>8} {'GFLOP/s':>8} {'x plain':>8}"
        print(head + "\n" + "-" * len(head))
        for key in args.groups.split(","):
            name, width, experts, make_router = configs[key]
            torch.manual_seed(0)
            moe = MoE(d_model=d, d_ff=width, num_experts=experts, router=make_router(), activation="swiglu")
            with torch.no_grad():
                routing = moe.router(x)
            sizes = routing.group_sizes.tolist()
            xs = x.reshape(-1, d).index_select(0, routing.token_index).contiguous()
            fns = {"condcomp MoE layer": step_fn(lambda t, m=moe: m(t)[0], x, precision)}
            if key == "peers":
                fns.update(hf_peers(moe, x, precision))
                fns.update(st_moe_peer(d, width, experts, x, precision))
                # The bound for any implementation on these loads: the expert GEMMs alone.
                fns["split/unbind loop (no routing)"] = ideals(moe, xs, sizes, precision)["split/unbind loop"]
            else:
                fns.update(ideals(moe, xs, sizes, precision))
            fns["plain 2048³ GEMM"] = lambda: plain_a @ plain_b
            times = timed_alternating(fns, args.rounds, warmup=1)
            plain = 2 * 2048**3 / times.pop("plain 2048³ GEMM")
            print(f"{name:34} {'plain 2048³ GEMM (same rounds)':44} {'':>8} {plain / 1e9:>8.0f} {1:>7.0%}")
            flops = expert_flops(sum(sizes), d, width)
            for row, t in times.items():
                rate = "" if row.startswith("st-moe") else f"{flops / t / 1e9:>8.0f} {flops / t / plain:>7.0%}"
                print(f"{name:34} {row:44} {t * 1e3:>8.1f} {rate}", flush=True)
    print("\nGFLOP/s: expert GEMM FLOPs (forward + backward) per second; x plain: that over the plain GEMM rate. "
          "st-moe routes by itself (its loads differ): its time only.")


if __name__ == "__main__":
    main()
