"""Structured FFN pruning that physically removes channels: a Transformer and one channel mask per
layer (the same kept count in every layer) -> a smaller dense Transformer whose FFNs hold only the
kept rows of ``up`` and columns of ``down``. It is an ordinary condcomp model (``d_ff`` = the kept
count): it saves, loads, exports and decodes like any other, at the speed of its size.

    small = compact(model)                       # ffn: prunable, method static or magnitude
    small = compact_for_prompt(model, prompt)    # method conditioned: the prompt picks the channels
    text = small.generate(prompt, 256)           # the whole generation runs the compact model

The masks come from a trained ``ffn: prunable`` model (``channel_masks``), or, for a plain dense
model, from ``magnitude_masks`` (the trivial baseline: |up rows| x |down column|).
"""

from __future__ import annotations

import torch

from condcomp.convert.coda import ConvertError
from condcomp.routing.channel_mask import hard_channel_mask, kept_channels, magnitude_scores


class PruneError(ConvertError):
    """The model or masks cannot be pruned as asked; the message says why."""


def _dense_ffns(model) -> list:
    """The FFN of every block: plain ``FeedForward`` layers, or the ``ffn: prunable`` ones (their
    subclasses, with the same weights)."""
    from condcomp.layers.feedforward import FeedForward

    if model.cfg.ffn not in ("swiglu", "gelu", "prunable") or model.cfg.block not in ("transformer", "parallel"):
        raise PruneError(f"channel pruning needs a dense or prunable model (ffn: swiglu, gelu or prunable; block: "
                         f"transformer or parallel); this one has ffn: {model.cfg.ffn}, block: {model.cfg.block}")
    ffns = [blk.ffn for blk in model.blocks]
    if not all(isinstance(f, FeedForward) for f in ffns):
        raise PruneError("channel pruning needs a FeedForward layer in every block")
    return ffns


def _activation(model) -> str:
    return model.cfg.prunable.activation if model.cfg.ffn == "prunable" else model.cfg.ffn


def channel_masks(model, prompt: torch.Tensor | None = None) -> list[torch.Tensor]:
    """The channels a trained ``ffn: prunable`` model keeps, bool [d_ff] per layer: its static mask
    (methods static and magnitude), or the one its predictors choose for ``prompt`` [1, t] (method
    conditioned; t >= prompt_len, the first prompt_len tokens are read)."""
    from condcomp.layers.prunable_ffn import PromptPrunedFeedForward

    ffns = _dense_ffns(model)
    if model.cfg.ffn != "prunable":
        raise PruneError(f"this model has ffn: {model.cfg.ffn}, no learned channel masks; use magnitude_masks(model, "
                         "sparsity), or train it with ffn: prunable first (condcomp prune train)")
    if not isinstance(ffns[0], PromptPrunedFeedForward):
        return [f.static_mask() for f in ffns]
    _check_prompt(model, prompt)
    return list(prompt_masks(model, prompt)[:, 0])


def _check_prompt(model, prompt) -> None:
    need = model.cfg.prunable.prompt_len
    if prompt is None or prompt.dim() != 2 or prompt.shape[0] != 1:
        raise PruneError(f"an input-conditioned model picks its channels from a prompt: give one prompt as token ids "
                         f"[1, t] with t >= {need}")
    if prompt.shape[1] < need:
        raise PruneError(f"the prompt has {prompt.shape[1]} tokens but this model's channel predictors read "
                         f"{need}; give a longer prompt")


def prompt_masks(model, prompts: torch.Tensor) -> torch.Tensor:
    """The channels an input-conditioned model keeps for each of ``prompts`` [b, t] (t >= its
    prompt_len): bool [n_layers, b, d_ff]. One eval-mode forward over the prompts' first prompt_len
    tokens; each layer's predictor reads the input that layer receives."""
    from condcomp.layers.prunable_ffn import PromptPrunedFeedForward

    ffns = _dense_ffns(model)
    if not all(isinstance(f, PromptPrunedFeedForward) for f in ffns):
        raise PruneError("prompt masks need an input-conditioned model (ffn: prunable, prunable.method: conditioned)")
    need = model.cfg.prunable.prompt_len
    if prompts.dim() != 2 or prompts.shape[1] < need:
        raise PruneError(f"the prompt has {prompts.shape[-1]} tokens but this model's channel predictors read "
                         f"{need}; give a longer prompt")
    _, inputs = _run_reading_ffn_inputs(model, prompts[:, :need])
    return torch.stack([f.prompt_mask(x) for f, x in zip(ffns, inputs)])


@torch.no_grad()
def _run_reading_ffn_inputs(model, tokens: torch.Tensor, **forward_kwargs):
    """(model(tokens, **forward_kwargs) in eval mode, the input each block's FFN received [b, t, d]
    in block order): what the per-layer channel predictors read."""
    ffns = _dense_ffns(model)
    inputs: dict[int, torch.Tensor] = {}
    hooks = [f.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0]))
             for i, f in enumerate(ffns)]
    was_training = model.training
    try:
        model.eval()
        out = model(tokens, **forward_kwargs)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return out, [inputs[i] for i in range(len(ffns))]


def magnitude_masks(model, sparsity: float) -> list[torch.Tensor]:
    """Per layer, the channels with the largest |up rows| x |down column|: bool [d_ff] each, the
    same kept count everywhere."""
    ffns = _dense_ffns(model)
    keep = kept_channels(model.cfg.ffn_hidden, sparsity)
    return [hard_channel_mask(magnitude_scores(f.up.weight.detach(), f.down.weight.detach(), f.activation), keep)
            for f in ffns]


@torch.no_grad()
def prune_ffn_channels(model, masks: list[torch.Tensor], *, share: bool = False):
    """A new dense Transformer with each layer's FFN cut to its mask's channels (masks: one bool
    [d_ff] per layer, all keeping the same count). Its output equals ``model`` with the pruned
    channels' activations set to zero. The original is left unchanged.

    share: the new model uses the original's tensors for everything but the FFNs instead of copies
    (per-prompt compaction: nothing but the kept FFN channels is copied, so it costs one gather).
    The model is built on the meta device and then given its tensors: no time goes into an
    initialisation that would be overwritten."""
    from condcomp.models import Transformer

    ffns = _dense_ffns(model)
    d_ff = model.cfg.ffn_hidden
    if len(masks) != len(ffns):
        raise PruneError(f"got {len(masks)} masks for {len(ffns)} layers; give one per layer")
    counts = {int(m.sum()) for m in masks}
    if any(m.shape != (d_ff,) for m in masks):
        raise PruneError(f"each mask must be bool [{d_ff}] (the model's d_ff)")
    if len(counts) != 1 or 0 in counts:
        raise PruneError(f"every layer must keep the same number (at least 1) of channels to make one dense model; "
                         f"got kept counts {sorted(counts)}")
    kept = counts.pop()
    cfg = type(model.cfg).from_dict({**model.cfg.to_dict(), "ffn": _activation(model), "d_ff": kept})
    with torch.device("meta"):
        small = Transformer(cfg)
    wanted = small.state_dict()
    # Parameters and buffers, persistent or not (rotary tables), of everything but the FFNs; the
    # predictors and gates of a prunable model stay behind.
    tensors = {**dict(model.named_buffers()), **dict(model.named_parameters(remove_duplicate=False))}
    tensors = {k: (v.detach() if share else v.detach().clone()) for k, v in tensors.items()}
    for i, (ffn, mask) in enumerate(zip(ffns, masks)):
        tensors[f"blocks.{i}.ffn.up.weight"], tensors[f"blocks.{i}.ffn.down.weight"] = \
            ffn.channel_weights(mask.bool().nonzero().squeeze(-1))
    small.load_state_dict({k: v for k, v in tensors.items() if k in wanted}, assign=True)
    for name, _ in list(small.named_buffers()):
        if name not in wanted:  # non-persistent buffers
            owner, _, leaf = name.rpartition(".")
            small.get_submodule(owner)._buffers[leaf] = tensors[name]
    if cfg.tie_embeddings:
        small.lm_head.weight = small.embed.weight
    if any(t.is_meta for t in [*small.parameters(), *small.buffers()]):
        raise PruneError("internal: a tensor of the pruned model was left unset")
    for p in small.parameters():
        p.requires_grad_(True)
    return small.train(model.training)


@torch.no_grad()
def prefill(model, prompt: torch.Tensor):
    """An input-conditioned model reads ``prompt`` [1, t] (t >= prompt_len) once, through its masked
    layers with a key/value cache, while its predictors pick the channels; returns (the compact model
    for those channels, the cache, the logits [1, vocab] after the prompt). The compact model
    computes the same keys and values, so it decodes on from that cache:
    ``small.generate(prompt, n, prefilled=(cache, logits))``."""
    from condcomp.layers.kv_cache import ModelCache

    _check_prompt(model, prompt)
    cache = ModelCache()
    out, inputs = _run_reading_ffn_inputs(model, prompt, cache=cache, last_only=True)
    masks = [f.prompt_mask(x)[0] for f, x in zip(_dense_ffns(model), inputs)]
    return prune_ffn_channels(model, masks, share=True).eval(), cache, out.logits[:, -1]


@torch.no_grad()
def generate(model, prompt: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
    """``model.generate`` for any model, pruned ones as they are deployed: a static prunable model
    decodes with its compact model; an input-conditioned one goes through ``prefill`` (one pass over
    the prompt picks the channels and fills the cache) and its compact model decodes from there.
    prompt: [1, t] for a conditioned model (t >= prompt_len). ``sampling``: temperature, top_k,
    generator."""
    if model.cfg.ffn != "prunable" or model.cfg.prunable.method != "conditioned":
        return for_generation(model, prompt).generate(prompt, max_new_tokens, **sampling)
    _check_prompt(model, prompt)
    if prompt.shape[1] + max_new_tokens > model.cfg.seq_len:
        return compact_for_prompt(model, prompt).generate(prompt, max_new_tokens, **sampling)  # no cache: recompute
    small, cache, logits = prefill(model, prompt)
    return small.generate(prompt, max_new_tokens, prefilled=(cache, logits), **sampling)


def for_generation(model, prompt: torch.Tensor):
    """The model to decode ``prompt`` [1, t] with: the compact model for a prunable one (chosen for
    this prompt when input-conditioned), the model itself otherwise."""
    if model.cfg.ffn != "prunable":
        return model
    return compact_for_prompt(model, prompt) if model.cfg.prunable.method == "conditioned" else compact(model)


def compact(model):
    """The compact dense model of a trained static ``ffn: prunable`` model (method static or
    magnitude): its outputs equal the prunable model's in eval mode."""
    return prune_ffn_channels(model, channel_masks(model))


def compact_for_prompt(model, prompt: torch.Tensor):
    """The compact dense model an input-conditioned model uses for ``prompt`` [1, t] (t >= its
    prompt_len): run it on the prompt and every generated token. From position prompt_len - 1 on its
    outputs equal the prunable model's in eval mode."""
    return prune_ffn_channels(model, channel_masks(model, prompt), share=True)
