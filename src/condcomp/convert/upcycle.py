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


def upcycle(model, *, num_experts: int, k: int = 2, every: int = 1, layers: list[int] | None = None,
            router: str = "top_k", capacity_factor: float | None = None, noise: float = 0.0, seed: int = 0,
            granularity: int = 1):
    """A new Transformer whose chosen FFNs are each an MoE of ``num_experts`` copies of the dense FFN;
    everything else is copied unchanged. The chosen layers: ``layers`` (indices from 0), else every
    ``every``-th (layer i with (i + 1) % every == 0).

    router: "top_k" (k experts per token, renormalised gates, ``capacity_factor`` None = dropless) or
        "expert_choice" (per-position, capacity_factor default 2.0; no step-0 equality: each token
        gets as many experts as chose it).
    granularity: G > 1 makes fine-grained experts: the FFN's hidden units are cut into G segments and
        each of the num_experts / G copies becomes G experts of d_ff / G units; the router picks k * G
        of them, so a token's active compute is still k dense FFNs. Each segment's down projection is
        scaled by G and the G segments of a copy start with the same router row, so the top-(k G)
        choice takes whole copies and step 0 still equals the dense model (tested).
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
    if layers is not None:
        bad = [i for i in layers if not 0 <= i < cfg.n_layers]
        if bad or not layers or len(set(layers)) != len(layers):
            raise ConvertError(f"layers: expected distinct indices in 0..{cfg.n_layers - 1} (the model has "
                               f"{cfg.n_layers} layers), got {list(layers)}")
        layers = sorted(layers)
    if noise < 0:
        raise ConvertError(f"noise must be >= 0, got {noise}")
    G = granularity
    if G < 1 or num_experts % G or cfg.ffn_hidden % G:
        raise ConvertError(f"granularity must be >= 1 and divide num_experts={num_experts} and the FFN's hidden size "
                           f"{cfg.ffn_hidden}, got {granularity}")
    if G > 1 and router != "top_k":
        raise ConvertError("granularity > 1 is for top_k routing (the router picks k * granularity segments)")
    d_ff_expert = cfg.ffn_hidden // G
    section = copy.deepcopy(cfg.to_dict())
    section["ffn"] = "moe"
    section["init"] = None
    section["moe"] = {"num_experts": num_experts, "router": router, "k": k * G, "activation": cfg.ffn,
                      "d_ff": d_ff_expert, "moe_every": every, "layers": layers, "renormalize": True,
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
            if not new_cfg.moe.is_moe_layer(i):
                continue
            dense_ffn = model.blocks[i].ffn
            up = dense_ffn.up.weight.t()      # [d, width]: (gate | up) for swiglu
            down = dense_ffn.down.weight.t()  # [d_ff, d]
            halves = up.chunk(2, dim=1) if cfg.ffn == "swiglu" else (up,)
            experts = block.ffn.experts
            for e in range(num_experts):
                seg = slice((e % G) * d_ff_expert, (e % G + 1) * d_ff_expert)
                seg_up = torch.cat([h[:, seg] for h in halves], dim=1)
                seg_down = down[seg] * G
                scale_up = 1 + noise * torch.randn(seg_up.shape, generator=generator, dtype=torch.float64).to(dtype)
                scale_down = 1 + noise * torch.randn(seg_down.shape, generator=generator, dtype=torch.float64).to(dtype)
                experts.up[e].copy_(seg_up * scale_up if noise else seg_up)
                experts.down[e].copy_(seg_down * scale_down if noise else seg_down)
            if G > 1:  # the segments of one copy share a router row, so top-(k G) takes whole copies
                gate = block.ffn.router.gate.weight
                gate.copy_(gate[::G].repeat_interleave(G, dim=0))
    return moe_model.train(model.training)
