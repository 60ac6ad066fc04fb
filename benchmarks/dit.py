"""DiT training-step speed against the ideal, and sampling throughput, for the ecdit grid's variants.

Training step (forward + backward of the rectified-flow loss, batch 64 of 28x28 digits, 16 patches of 7x7):
each MoE variant is timed against the same model whose MoE layers run only their experts' GEMMs
on pre-grouped tokens with the loads the router produced (no router, no gather, no scatter, no
combine: ``IdealMoE`` below) — the goal is EC-DiT <= 1.1x its ideal. The dense DiT is timed too:
what a user would pick instead. Sampling: images/s of 20-step guided Euler sampling (a doubled
batch per step), per variant. Rows are timed alternately in one run.

    .venv/bin/python benchmarks/dit.py [--rounds 15]
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

from condcomp.bench.measure import timed_alternating
from condcomp.layers.info import LayerInfo
from condcomp.dit_config import DiTConfig
from condcomp.models.dit import DiT
from condcomp.models.flow import flow_loss, sample
from condcomp.settings import from_dict
from condcomp.train.optim import autocast

SHAPE = {"d_model": 128, "n_layers": 4, "n_heads": 4, "patch": 7, "image_size": 28}  # configs/grids/ecdit.yaml
VARIANTS = {
    "dense (GELU 512)": {"ffn": "gelu"},
    "token-choice top-2 (8 x 256, dropless)": {"ffn": "moe", "moe": {"router": "top_k", "k": 2, "capacity_factor": None,
                                                                       "num_experts": 8, "d_ff": 256}},
    "EC-DiT (8 x 256, capacity 2)": {"ffn": "moe", "moe": {"num_experts": 8, "d_ff": 256}},
}


class IdealMoE(nn.Module):
    """The experts of ``moe`` on contiguous slices of the tokens with fixed loads ``sizes`` (those the
    router produced): rows are the layer's input repeated as often as the loads need, a view and one
    copy; the slices' outputs are summed back onto the tokens by reshaping. y: [b, t, d]."""

    def __init__(self, moe, sizes: list[int]):
        super().__init__()
        self.experts, self.sizes = moe.experts, sizes

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        n, total = flat.shape[0], sum(self.sizes)
        rows = flat.repeat(-(-total // n), 1)[:total]
        run = self.experts.groups()
        ys = torch.cat([run(g, chunk) for g, chunk in enumerate(rows.split(self.sizes)) if chunk.shape[0]])
        ys = torch.nn.functional.pad(ys, (0, 0, 0, -total % n))
        return ys.view(-1, n, ys.shape[-1]).sum(0).view(x.shape), LayerInfo()


def loads_of(model, x, t, y) -> list[list[int]]:
    """Each MoE layer's per-expert loads on one training batch."""
    loads = []
    hooks = [blk.ffn.router.register_forward_hook(lambda m, a, r: loads.append(r.group_sizes.tolist()))
             for blk in model.blocks]
    with torch.no_grad():
        model(x, t, y)
    for h in hooks:
        h.remove()
    return loads


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"))
    p.add_argument("--sample-batch", type=int, default=64)
    args = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28).clamp(-1, 1)
    labels = torch.randint(0, 10, (args.batch,))
    models = {name: DiT(from_dict(DiTConfig, {**SHAPE, **v})).train() for name, v in VARIANTS.items()}
    for m in models.values():  # away from adaLN-Zero's identity start, as after some training
        for prm in m.parameters():
            if prm.dim() == 1 and prm.shape[0] % 6 == 0:
                nn.init.normal_(prm, std=0.02)
    steps = {}
    for name, model in list(models.items()):
        steps[name] = model
        if "moe" in VARIANTS[name]["ffn"]:
            ideal = copy.deepcopy(model)
            t = torch.rand(args.batch)
            for blk, sizes in zip(ideal.blocks, loads_of(model, x, t, labels)):
                blk.ffn = IdealMoE(blk.ffn, sizes)
            steps[f"  ideal of {name}"] = ideal

    def step_fn(model):
        def run():
            with autocast(args.precision):
                loss, _ = flow_loss(model, x, labels, generator=torch.Generator().manual_seed(0))
            loss.backward()
            model.zero_grad(set_to_none=True)
        return run

    times = timed_alternating({n: step_fn(m) for n, m in steps.items()}, args.rounds)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; training step, batch {args.batch}, "
          f"{args.precision}, d_model 128, 4 layers, 16 patches\n")
    print("| variant | step ms | x its ideal | x dense |\n|---|---:|---:|---:|")
    dense = times["dense (GELU 512)"]
    for name, sec in times.items():
        if name.startswith("  ideal"):
            continue
        ideal = times.get(f"  ideal of {name}")
        print(f"| {name} | {sec * 1e3:.1f} | {f'{sec / ideal:.2f}x' if ideal else ''} | {sec / dense:.2f}x |")
        if ideal:
            print(f"| ideal of {name} | {ideal * 1e3:.1f} | | {ideal / dense:.2f}x |")

    sample_labels = torch.arange(args.sample_batch) % 10

    def sampler(model):
        model.eval()

        def run():
            with autocast(args.precision):
                sample(model, sample_labels, steps=20, guidance=2.0, generator=torch.Generator().manual_seed(0))
        return run

    s_times = timed_alternating({n: sampler(m) for n, m in models.items()}, max(3, args.rounds // 3))
    print(f"\n| variant | 20-step guided sampling, {args.sample_batch} images: s | images/s |\n|---|---:|---:|")
    for name, sec in s_times.items():
        print(f"| {name} | {sec:.2f} | {args.sample_batch / sec:.1f} |")


if __name__ == "__main__":
    main()
