"""MoE layer speed and activation memory against the ideal: the bare expert GEMMs.

For each router the "ideal" runs the same experts on contiguous, pre-grouped slices with exactly the
loads that router produced (no routing, no gather, no scatter, no combine). Every row is a ratio to
the ideal of its own loads, measured in the same run. Peers (HF transformers' Mixtral sparse block,
st-moe-pytorch) are included when installed (`pip install -e ".[peers]"`).

Memory column: bytes of tensors autograd saves for the backward pass (unique storages, via
saved_tensors_hooks) plus the output — the activation memory of forward+backward, which is what
routing overhead adds to; parameters and their gradients are the same for every row.

    .venv/bin/python benchmarks/moe.py [--tokens 4096 --d-model 512 --d-ff 2048 --experts 8]
"""

from __future__ import annotations

import argparse
import torch

from condcomp.bench import parameter_storages, prepare, timed_pair
from condcomp.layers import FeedForward
from condcomp.layers.moe import MoE
from condcomp.routing import ExpertChoiceRouter, TopKRouter


MODULES: list[torch.nn.Module] = []  # every layer benchmarked, so parameter storages can be excluded


def ideal_fn(experts, x_sorted: torch.Tensor, sizes: list[int]):
    def run():
        outs = [experts(g, chunk) for g, chunk in enumerate(x_sorted.split(sizes)) if chunk.shape[0]]
        return torch.cat(outs)

    return run


def prepare_row(make_forward, x, dtype):
    """(forward-only callable, forward+backward callable, activation bytes) for y = make_forward()(x)."""
    p = prepare(make_forward(), x, dtype, parameter_storages(MODULES))
    return p.forward, p.both, p.act_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--rounds", type=int, default=15, help="alternating timing rounds per row")
    p.add_argument("--dtypes", default="fp32,bf16")
    args = p.parse_args()
    torch.manual_seed(0)
    d, dff, e, n = args.d_model, args.d_ff, args.experts, args.tokens
    batch = 8
    x = torch.randn(batch, n // batch, d)

    routers = {
        "top-1 (CF 1.25)": lambda: TopKRouter(d_model=d, num_experts=e, k=1, capacity_factor=1.25),
        "top-2 (CF 1.25)": lambda: TopKRouter(d_model=d, num_experts=e, k=2, capacity_factor=1.25),
        "EC-CF2 per-position": lambda: ExpertChoiceRouter(d_model=d, num_experts=e, capacity_factor=2.0,
                                                          mode="per_position"),
    }
    rows = []  # (name, make_forward, ideal_name)
    for name, make_router in routers.items():
        moe = MoE(d_model=d, d_ff=dff, num_experts=e, router=make_router(), activation="gelu")
        MODULES.append(moe)
        with torch.no_grad():
            routing = moe.router(x)
        sizes = routing.group_sizes.tolist()
        # The ideal differentiates w.r.t. its input too, as the real layer must.
        x_sorted = x.reshape(-1, d).index_select(0, routing.token_index).contiguous().requires_grad_(True)
        rows.append((f"ideal {name}", lambda m=moe, xs=x_sorted, s=sizes: (lambda _x: ideal_fn(m.experts, xs, s)()),
                     None, sum(sizes)))
        rows.append((f"condcomp {name}", lambda m=moe: (lambda _x: m(_x)[0]), f"ideal {name}", sum(sizes)))
    dense = FeedForward(d_model=d, d_ff=dff, activation="gelu")
    MODULES.append(dense)
    rows.append(("dense FFN (1 expert's width)", lambda: (lambda _x: dense(_x)[0]), None, n))

    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

        cfg = MixtralConfig(hidden_size=d, intermediate_size=dff, num_local_experts=e, num_experts_per_tok=2)
        hf = MixtralSparseMoeBlock(cfg)
        MODULES.append(hf)
        with torch.no_grad():
            _, _, top_i = hf.gate(x.reshape(-1, d))
        hf_sizes = torch.bincount(top_i.reshape(-1), minlength=e).tolist()
        # The ideal for HF's loads uses condcomp experts of the same shape (SwiGLU, as Mixtral's).
        from condcomp.layers.experts import Experts

        hf_ideal = Experts(num_experts=e, d_model=d, d_ff=dff, activation="swiglu")
        MODULES.append(hf_ideal)
        xs_hf = torch.randn(sum(hf_sizes), d, requires_grad=True)
        rows.append(("ideal HF Mixtral loads (SwiGLU)", lambda: (lambda _x: ideal_fn(hf_ideal, xs_hf, hf_sizes)()),
                     None, sum(hf_sizes)))
        rows.append(("HF transformers Mixtral top-2", lambda: hf, "ideal HF Mixtral loads (SwiGLU)", sum(hf_sizes)))
        swiglu_moe = MoE(d_model=d, d_ff=dff, num_experts=e, activation="swiglu",
                         router=TopKRouter(d_model=d, num_experts=e, k=2, capacity_factor=None))
        MODULES.append(swiglu_moe)
        with torch.no_grad():
            r = swiglu_moe.router(x)
        s2 = r.group_sizes.tolist()
        xs2 = x.reshape(-1, d).index_select(0, r.token_index).contiguous().requires_grad_(True)
        rows.append(("ideal top-2 dropless (SwiGLU)",
                     lambda m=swiglu_moe, xs=xs2, s=s2: (lambda _x: ideal_fn(m.experts, xs, s)()), None, sum(s2)))
        rows.append(("condcomp top-2 dropless (SwiGLU)", lambda m=swiglu_moe: (lambda _x: m(_x)[0]),
                     "ideal top-2 dropless (SwiGLU)", sum(s2)))
    except ImportError:
        print("(transformers not installed: HF Mixtral row skipped)")

    try:
        from st_moe_pytorch import MoE as STMoE

        st = STMoE(dim=d, num_experts=e, expert_hidden_mult=dff // d, gating_top_n=2, capacity_factor_train=1.25,
                   threshold_train=0.0)
        # st-moe's experts are GELU FFNs of the same shape; its loads are capped at capacity,
        # so the ideal of condcomp top-2 CF1.25 (similar loads) is its fair reference.
        MODULES.append(st)
        # Its per-expert loads are internal, so it is compared with condcomp's top-2 CF 1.25 instead.
        rows.append(("st-moe-pytorch top-2 (CF 1.25)", lambda: (lambda _x: st(_x)[0]), "condcomp top-2 (CF 1.25)", None))
    except ImportError:
        print("(st-moe-pytorch not installed: row skipped; pip install -e '.[peers]')")

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {n} tokens, d_model {d}, d_ff {dff}, "
          f"{e} experts, GELU experts unless noted\n")
    for dtype in args.dtypes.split(","):
        header = (f"{dtype:>4} {'':36} {'assign':>6} {'fwd ms':>8} {'x ideal':>8} {'fwd+bwd ms':>10} {'x ideal':>8} "
                  f"{'act MiB':>8} {'x ideal':>8}")
        print(header)
        print("-" * len(header))
        prepared = {name: prepare_row(make, x, dtype) for name, make, _, _ in rows}
        for name, _, ideal_name, assigned in rows:
            f_only, f_both, mem = prepared[name]
            if ideal_name:
                r_only, r_both, r_mem = prepared[ideal_name]
                f, i_f = timed_pair(f_only, r_only, args.rounds)
                fb, i_fb = timed_pair(f_both, r_both, args.rounds)
                ratios = (f"{f / i_f:>7.2f}x", f"{fb / i_fb:>7.2f}x", f"{mem / r_mem:>7.2f}x")
            else:
                f, _ = timed_pair(f_only, f_only, max(3, args.rounds // 3))
                fb, _ = timed_pair(f_both, f_both, max(3, args.rounds // 3))
                ratios = ("", "", "")
            print(f"{'':4} {name:36} {assigned or '':>6} {f * 1e3:>8.1f} {ratios[0]:>8} {fb * 1e3:>10.1f} "
                  f"{ratios[1]:>8} {mem / 2**20:>8.1f} {ratios[2]:>8}")
        print()
    print("ratios: the row / the ideal of its own expert loads, timed alternately in the same run "
          "(st-moe-pytorch: / condcomp top-2 CF 1.25)")


if __name__ == "__main__":
    main()
