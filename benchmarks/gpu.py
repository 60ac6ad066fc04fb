"""GPU tables: MoE expert throughput against the plain-GEMM rate, MoD and MoE training steps against
dense, attention against PyTorch's fused kernel — all measured in one run on one CUDA device.

Every time is the median over alternating rounds (``timed_alternating``; torch.utils.benchmark
synchronises the device around each timed call), so drift hits every row alike. Ratios compare
rows of the same run only.

    PYTHONPATH=src python3 benchmarks/gpu.py [--quick]

Tables:
1. MoE forward+backward (expert FLOPs / s and the fraction of the plain bf16 or fp32 GEMM rate, a
   2 x 4096 x 4096 x 4096 product, measured in the same run), for condcomp's dispatch with the grouped
   GEMM (CUDA default) and with the per-expert loop, and HF transformers' Mixtral sparse block (its
   default expert backend) on the same weights.
2. LM training step (forward+backward+AdamW) tokens/s: dense vs MoD (capacity 0.125) vs top-2 MoE vs
   expert-choice MoE, bf16 autocast.
3. Causal attention forward+backward: condcomp's layer vs bare F.scaled_dot_product_attention.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import condcomp.dispatch.grouped as grouped_dispatch
from condcomp.bench.measure import gemm_rate, timed_alternating
from condcomp.config import ModelConfig
from condcomp.layers.moe import MoE
from condcomp.models import Transformer
from condcomp.routing import ExpertChoiceRouter, TopKRouter
from condcomp.settings import from_dict

DEV = torch.device("cuda")  # --device cpu: a quick smoke run of the script itself, on tiny sizes


def expert_flops(moe: MoE, assignments: int, d: int, dff: int) -> float:
    """Forward+backward FLOPs of the expert GEMMs for this many assignments (3x the forward's)."""
    width = dff * (2 if moe.experts.activation == "swiglu" else 1)
    return 3 * 2 * assignments * (d * width + dff * d)


def moe_table(args) -> None:
    d, dff, e, n = args.d_model, args.d_ff, args.experts, args.tokens
    x = torch.randn(8, n // 8, d, device=DEV)
    configs = {
        "top-1 CF 1.25": (dict(k=1, capacity_factor=1.25), d, dff, e),
        "top-2 dropless": (dict(k=2, capacity_factor=None), d, dff, e),
        "EC CF 2 per-position": ("ec", d, dff, e),
        "top-8 of 64 dropless (d_ff 256)": (dict(k=8, capacity_factor=None), d, 256, 64),
    }
    for dtype_name in ("bf16", "fp32"):
        dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
        plain = gemm_rate(dtype, 4096 if DEV.type == "cuda" else 256, args.rounds, device=DEV)
        print(f"\nMoE forward+backward, {dtype_name}, {n} tokens, d_model {d}, SwiGLU experts; plain GEMM "
              f"{plain / 1e12:.1f} TFLOP/s")
        head = f"{'router':34} {'dispatch':22} {'ms':>8} {'TFLOP/s':>8} {'x plain':>8}"
        print(head + "\n" + "-" * len(head))
        for name, (router, dm, width, experts) in configs.items():
            torch.manual_seed(0)
            if router == "ec":
                r = ExpertChoiceRouter(d_model=dm, num_experts=experts, capacity_factor=2.0, mode="per_position")
            else:
                r = TopKRouter(d_model=dm, num_experts=experts, **router)
            moe = MoE(d_model=dm, d_ff=width, num_experts=experts, router=r, activation="swiglu").to(DEV)
            with torch.no_grad():
                assignments = moe.router(x).token_index.numel()
            xg = x.detach().requires_grad_(True)
            grad = torch.randn_like(x)

            def step(m=moe, mode="auto"):
                grouped_dispatch.GROUPED = mode
                with torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                    y = m(xg)[0]
                y.backward(grad)

            def route(m=moe):
                m.router(xg).combine_weights.sum().backward()

            fns = {"grouped (default)": lambda: step(mode="auto"), "per-expert loop": lambda: step(mode="never"),
                   "router alone": route}
            times = timed_alternating(fns, args.rounds, warmup=2)
            grouped_dispatch.GROUPED = "auto"
            flops = expert_flops(moe, assignments, dm, width)
            for row, t in times.items():
                if row == "router alone":
                    print(f"{name:34} {row:22} {t * 1e3:>8.2f}")
                    continue
                print(f"{name:34} {row:22} {t * 1e3:>8.2f} {flops / t / 1e12:>8.1f} {flops / t / plain:>7.0%}")
        from condcomp.layers.experts import _GROUPED_UNSUPPORTED

        refused = sorted(str(k) for k in _GROUPED_UNSUPPORTED)
        print(f"grouped GEMM refused (so the loop ran) for: {', '.join(refused) or 'nothing'}")
        hf_row(x, d, dff, e, dtype, args.rounds, plain)


def hf_row(x, d, dff, e, dtype, rounds, plain) -> None:
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        print("(transformers not installed: no HF Mixtral row)")
        return
    xg = x.detach().requires_grad_(True)
    grad = torch.randn_like(x)

    def run(module):
        def step():
            with torch.autocast(DEV.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                out = module(xg)
                y = out[0] if isinstance(out, tuple) else out
            y.backward(grad)
        return step

    fns = {}
    for backend in ("eager", "grouped_mm"):
        torch.manual_seed(0)
        cfg = MixtralConfig(hidden_size=d, intermediate_size=dff, num_local_experts=e, num_experts_per_tok=2,
                            experts_implementation=backend)
        hf = MixtralSparseMoeBlock(cfg).to(DEV)
        for p in hf.parameters():  # created uninitialised outside from_pretrained
            torch.nn.init.normal_(p, std=0.02)
        fns[f"HF Mixtral {backend}"] = run(hf)
    ours = MoE(d_model=d, d_ff=dff, num_experts=e, activation="swiglu",
               router=TopKRouter(d_model=d, num_experts=e, k=2, capacity_factor=None)).to(DEV)
    fns["condcomp top-2"] = run(ours)
    times = timed_alternating(fns, rounds, warmup=2)
    flops = expert_flops(ours, 2 * x.shape[0] * x.shape[1], d, dff)
    for row, t in times.items():
        print(f"{'top-2 dropless, peers':34} {row:22} {t * 1e3:>8.2f} {flops / t / 1e12:>8.1f} {flops / t / plain:>7.0%}")


def train_table(args) -> None:
    for spec in args.lm.split(","):
        d_model, layers, batch, seq = (int(v) for v in spec.split("x"))
        train_rows(args, d_model, layers, batch, seq)


def train_rows(args, d_model: int, layers: int, batch: int, seq: int) -> None:
    print(f"\nLM training step (forward, backward, fused AdamW), bf16 autocast, batch {batch} x {seq}, "
          f"d_model {d_model}, {layers} layers")
    base = dict(d_model=d_model, n_layers=layers, n_heads=d_model // 64, seq_len=seq)
    variants = {
        "dense": {},
        "MoD capacity 0.125": dict(block="mod", mod={"every": 2, "capacity": 0.125}),
        "MoE top-2 (8 experts)": dict(ffn="moe", moe=dict(num_experts=8, k=2, capacity_factor=None)),
        "MoE expert choice CF 2": dict(ffn="moe", moe=dict(num_experts=8, router="expert_choice", capacity_factor=2.0,
                                                            expert_choice_mode="per_position")),
    }
    tokens = torch.randint(0, 256, (batch, seq + 1), device=DEV)
    fns = {}
    for name, extra in variants.items():
        torch.manual_seed(0)
        model = Transformer(from_dict(ModelConfig, {**base, **extra})).to(DEV).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEV.type == "cuda")

        def step(model=model, opt=opt):
            with torch.autocast(DEV.type, dtype=torch.bfloat16):
                out = model(tokens[:, :-1])
                loss = F.cross_entropy(out.logits.float().flatten(0, 1), tokens[:, 1:].flatten())
                loss = loss + 0.01 * sum(out.aux_losses.values())
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        fns[name] = step
    times = timed_alternating(fns, args.rounds, warmup=3)
    head = f"{'variant':28} {'ms/step':>8} {'tokens/s':>10} {'x dense':>8}"
    print(head + "\n" + "-" * len(head))
    for name, t in times.items():
        print(f"{name:28} {t * 1e3:>8.2f} {batch * seq / t:>10.0f} {times['dense'] / t:>7.2f}x")


def attention_table(args) -> None:
    from condcomp.layers.attention import Attention

    print("\nCausal attention forward+backward, bf16, 8 heads of 64")
    head = f"{'seq':>6} {'condcomp ms':>12} {'bare SDPA ms':>13} {'x SDPA':>7}"
    print(head + "\n" + "-" * len(head))
    for seq in ((1024, 4096) if DEV.type == "cuda" else (64,)):
        torch.manual_seed(0)
        attn = Attention(d_model=512, n_heads=8, max_len=seq).to(DEV)
        x = torch.randn(4, seq, 512, device=DEV, requires_grad=True)
        q = torch.randn(4, 8, seq, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)

        def ours():
            with torch.autocast(DEV.type, dtype=torch.bfloat16):
                y = attn(x)[0]
            y.float().sum().backward()

        def bare():
            F.scaled_dot_product_attention(q, q, q, is_causal=True).float().sum().backward()

        t = timed_alternating({"ours": ours, "bare": bare}, args.rounds, warmup=2)
        print(f"{seq:>6} {t['ours'] * 1e3:>12.2f} {t['bare'] * 1e3:>13.2f} {t['ours'] / t['bare']:>6.2f}x")
    print("(condcomp's layer includes its q/k/v/out projections and rotary; bare SDPA is the kernel alone)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--d-ff", type=int, default=2048)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--lm", default="512x8x16x512,1024x12x8x2048",
                   help="LM shapes for the training table, d_model x layers x batch x seq, comma-separated")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--tables", default="moe,train,attention")
    p.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test this script")
    args = p.parse_args()
    global DEV
    DEV = torch.device(args.device)
    if DEV.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/gpu.py needs a CUDA device")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows are fp32 (the plain GEMM too)
    name = torch.cuda.get_device_name() if DEV.type == "cuda" else "CPU (smoke run)"
    print(f"{name}, torch {torch.__version__}; tokens {args.tokens}")
    for table in args.tables.split(","):
        try:
            {"moe": moe_table, "train": train_table, "attention": attention_table}[table](args)
        except Exception as exc:  # one table's failure must not cost the others (a lease is short)
            print(f"\n{table} table failed: {type(exc).__name__}: {exc}")
    if DEV.type == "cuda":
        print(f"\npeak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
