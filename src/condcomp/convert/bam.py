"""BAM's merge (Zhang et al., 2024, "BAM! Just Like That"): dense branches of one seed -> one mixture.

    merged = merge_branches(seed_model, [code_branch, prose_branch], attention="soft")

Expert e of every layer comes from model e of ``[seed] + branches`` (the seed is kept as one expert,
as the paper does; ``include_seed=False`` leaves it out):

- FFN experts: model e's FFN becomes expert e of a top-k MoE (renormalised gates, dropless unless
  ``capacity_factor``), in every layer.
- attention (``attention="soft"``): model e's q/k/v/o become attention expert e, soft-routed (every
  token mixes all experts). ``"soft_shared_kv"``: the same with one key/value projection, the average
  of the models' ones. ``"none"``: FFN experts only (BTX-style); attention averaged like the rest.
- everything else (embeddings, norms, output head) is the average of the models.

Routers start small and random (the model's init_std, seeded), as in upcycling. If every branch equals
the seed, the merged model computes exactly the seed's function (each mixture mixes identical experts
with gates that sum to 1; tested in float64).
"""

from __future__ import annotations

import torch

from condcomp.convert.coda import ConvertError

ATTENTION_MODES = ("soft", "soft_shared_kv", "none")
# Model settings that must agree for weights to be merged one-to-one.
_SHAPE_KEYS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff", "ffn", "block",
               "attention", "qkv_bias", "out_bias", "tie_embeddings")


def check_mergeable(seed, branches) -> None:
    """ConvertError naming the first branch whose architecture differs from the seed's."""
    if not branches:
        raise ConvertError("branches: BAM needs at least one trained branch")
    cfg = seed.cfg
    if cfg.ffn not in ("swiglu", "gelu"):
        raise ConvertError(f"seed: BAM merges dense models (ffn: swiglu or gelu); the seed has ffn: {cfg.ffn}")
    if cfg.attention != "causal" or cfg.block not in ("transformer", "parallel"):
        raise ConvertError(f"seed: BAM merges plain or parallel blocks with causal attention; the seed has "
                           f"block: {cfg.block}, attention: {cfg.attention}")
    for i, branch in enumerate(branches):
        diff = [f"{k}: {getattr(branch.cfg, k)!r} vs the seed's {getattr(cfg, k)!r}" for k in _SHAPE_KEYS
                if getattr(branch.cfg, k) != getattr(cfg, k)]
        if diff:
            raise ConvertError(f"branches[{i}] has another architecture than the seed ({'; '.join(diff)}); "
                               "every branch must be trained from the same seed")


def merge_branches(seed, branches: list, *, attention: str = "soft", k: int = 2, capacity_factor: float | None = None,
                   include_seed: bool = True, router_seed: int = 0):
    """A Transformer whose layers mix the models ``[seed] + branches`` (see the module docstring).

    seed, branches: Transformers of one architecture (dense FFN, causal attention).
    attention: "soft", "soft_shared_kv" or "none". k: FFN experts per token (top-k).
    """
    from condcomp.config import ModelConfig, from_dict
    from condcomp.models import Transformer

    if attention not in ATTENTION_MODES:
        raise ConvertError(f"attention must be one of {', '.join(ATTENTION_MODES)}, got {attention!r}")
    check_mergeable(seed, branches)
    models = ([seed] if include_seed else []) + list(branches)
    E = len(models)
    if not 1 <= k <= E:
        raise ConvertError(f"k must be between 1 and the {E} experts ({'seed + ' if include_seed else ''}"
                           f"{len(branches)} branches), got {k}")
    cfg = seed.cfg
    section = cfg.to_dict()
    section.update(ffn="moe", init=None)
    section["moe"] = {"num_experts": E, "router": "top_k", "k": k, "activation": cfg.ffn, "d_ff": cfg.ffn_hidden,
                      "moe_every": 1, "renormalize": True, "capacity_factor": capacity_factor}
    if attention != "none":
        section["attention"] = "experts"
        section["attention_experts"] = {"num_experts": E, "shared_kv": attention == "soft_shared_kv"}
    merged_cfg = from_dict(ModelConfig, section, prefix="model.")
    dtype = next(seed.parameters()).dtype
    with torch.random.fork_rng():
        torch.manual_seed(router_seed)
        merged = Transformer(merged_cfg).to(dtype)
    states = [m.state_dict() for m in models]
    with torch.no_grad():
        # Everything with the same name and shape in the dense models: their average.
        for key, value in merged.state_dict().items():
            if key in states[0] and states[0][key].shape == value.shape:
                value.copy_(torch.stack([s[key] for s in states]).mean(0))
        for i, block in enumerate(merged.blocks):
            dense_blocks = [m.blocks[i] for m in models]
            experts = block.ffn.experts
            for e, dense in enumerate(dense_blocks):
                experts.up[e].copy_(dense.ffn.up.weight.t())
                experts.down[e].copy_(dense.ffn.down.weight.t())
            if attention == "none":
                continue
            parts = [dict(d.attn.projections()) for d in dense_blocks]
            if attention == "soft_shared_kv":
                for name in ("k", "v", "k_bias", "v_bias"):
                    if name in parts[0]:
                        shared = torch.stack([p[name] for p in parts]).mean(0)
                        for p in parts:
                            p[name] = shared
            for e, p in enumerate(parts):
                block.attn.set_expert(e, p)
    return merged.train(seed.training)
