"""Sparse upcycling (Komatsuzaki et al., 2022): a dense model's FFNs become mixtures of experts, every
expert a copy of the FFN it replaces.

    moe_model = upcycle(dense_model, num_experts=8, k=2)          # every layer; dropless top-2
    moe_model = upcycle(dense_model, num_experts=8, k=2, every=2, noise=0.01)

With identical experts and renormalised top-k gates (k >= 2, the default here) the gates of each token
sum to 1 over copies of the same FFN, so at step 0 the upcycled model computes exactly what the dense
one did, whatever the router says (tested in float64). The router starts small and random (std
``init_std``), as in the paper: a zero router would give every expert the same probability, and its
ties would make the first steps' routing arbitrary rather than input-dependent. ``noise`` perturbs
each expert multiplicatively (1 + noise * N(0, 1)) so the experts can diverge; the step-0 loss then
moves by an amount the tests bound.
"""

from __future__ import annotations

import copy

import torch

from condcomp.convert.coda import ConvertError


def upcycle(model, *, num_experts: int, k: int = 2, every: int = 1, router: str = "top_k",
            capacity_factor: float | None = None, noise: float = 0.0, seed: int = 0):
    """A new Transformer whose every ``every``-th FFN (layer i with (i + 1) % every == 0) is an MoE of
    ``num_experts`` copies of the dense FFN; everything else is copied unchanged.

    router: "top_k" (k experts per token, renormalised gates, ``capacity_factor`` None = dropless) or
        "expert_choice" (per-position, capacity_factor default 2.0; no step-0 equality: each token
        gets as many experts as chose it).
    """
    from condcomp.config import ModelConfig, from_dict
    from condcomp.models import Transformer

    cfg = model.cfg
    if cfg.ffn not in ("swiglu", "gelu"):
        raise ConvertError(f"upcycling needs a dense model (ffn: swiglu or gelu); this one has ffn: {cfg.ffn}")
    if cfg.block != "transformer":
        raise ConvertError(f"upcycling works on plain transformer blocks; this model has block: {cfg.block}")
    if num_experts < 1:
        raise ConvertError(f"num_experts must be >= 1, got {num_experts}")
    if router == "top_k" and not 1 <= k <= num_experts:
        raise ConvertError(f"k must be between 1 and num_experts={num_experts}, got {k}")
    if not 1 <= every <= cfg.n_layers:
        raise ConvertError(f"every must be between 1 and the {cfg.n_layers} layers, got {every}")
    if noise < 0:
        raise ConvertError(f"noise must be >= 0, got {noise}")
    section = copy.deepcopy(cfg.to_dict())
    section["ffn"] = "moe"
    section["init"] = None
    section["moe"] = {"num_experts": num_experts, "router": router, "k": k, "activation": cfg.ffn,
                      "d_ff": cfg.ffn_hidden, "moe_every": every, "renormalize": True,
                      "capacity_factor": capacity_factor if router == "top_k" else (capacity_factor or 2.0)}
    new_cfg = from_dict(ModelConfig, section, prefix="model.")
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        moe_model = Transformer(new_cfg).to(dtype)
    dense_state = model.state_dict()
    new_state = moe_model.state_dict()
    with torch.no_grad():
        for key, value in new_state.items():
            if key in dense_state and dense_state[key].shape == value.shape:
                value.copy_(dense_state[key])
        for i, block in enumerate(moe_model.blocks):
            if (i + 1) % every:
                continue
            dense_ffn = model.blocks[i].ffn
            up = dense_ffn.up.weight.t()      # [d, width]
            down = dense_ffn.down.weight.t()  # [d_ff, d]
            experts = block.ffn.experts
            for e in range(num_experts):
                scale_up = 1 + noise * torch.randn(up.shape, generator=generator, dtype=torch.float64).to(dtype)
                scale_down = 1 + noise * torch.randn(down.shape, generator=generator, dtype=torch.float64).to(dtype)
                experts.up[e].copy_(up * scale_up if noise else up)
                experts.down[e].copy_(down * scale_down if noise else down)
    return moe_model.train(model.training)
