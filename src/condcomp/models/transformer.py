"""A configurable decoder-only Transformer LM.

Pre-norm blocks (RMSNorm), rotary positions, SDPA causal attention, SwiGLU or GELU FFN, tied input
and output embeddings. Each block's attention and feed-forward are named components from
``condcomp.models.components``, so conditional layers drop in through the config.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from condcomp.config import ModelConfig
from condcomp.layers.attention import Attention
from condcomp.layers.info import LayerInfo, split_output
from condcomp.layers.kv_cache import ModelCache
from condcomp.layers.norm import RMSNorm
from condcomp.layers.selected_block import LayerSkip, MixtureOfDepths
from condcomp.layers.sru import SRULayer, SRUppAttention
from condcomp.models import components
from condcomp.routing import BinaryGate


@dataclass
class ModelOutput:
    """logits: [batch, seq, vocab]. aux_losses: name -> scalar summed over layers.
    metrics: "layer{i}.{name}" -> detached value, for logging."""

    logits: torch.Tensor
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)


class AuxCollector:
    """Gathers the LayerInfo of every layer in one forward pass."""

    def __init__(self) -> None:
        self.losses: dict[str, torch.Tensor] = defaultdict(lambda: 0.0)
        self.metrics: dict[str, torch.Tensor | float] = {}

    def add(self, prefix: str, info: LayerInfo | None) -> None:
        if info is None:
            return
        for name, value in info.aux_losses.items():
            self.losses[name] = self.losses[name] + value
        for name, value in info.metrics.items():
            self.metrics[f"{prefix}.{name}"] = value.detach() if torch.is_tensor(value) else value


@components.register("block", "transformer")
class TransformerBlock(nn.Module):
    """x + attn(norm(x)), then + ffn(norm(x)).

    The block interface every block type shares:
    ``forward(x [b, t, d], padding_mask=None, positions=None, cache=None) -> (y, LayerInfo)``.
    padding_mask [b, t]: True = real token. positions [b, t]: original positions when the block runs
    on tokens gathered from a longer sequence. cache: a ModelCache for incremental decoding.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.d_model = cfg.d_model
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = components.build("attention", cfg.attention, cfg, layer_idx)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = components.build("ffn", cfg.ffn, cfg, layer_idx)

    @property
    def supports_cache(self) -> bool:
        return isinstance(self.attn, Attention)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: ModelCache | None = None):
        info = LayerInfo()
        kv = None
        if cache is not None:
            kv = cache.layer(f"layer{self.layer_idx}.attn")
            if positions is None:
                positions = (cache.offset + torch.arange(x.shape[1], device=x.device)).expand(x.shape[:2])
        if positions is None and kv is None:
            out = self.attn(self.attn_norm(x), padding_mask=padding_mask)
        else:
            out = self.attn(self.attn_norm(x), padding_mask=padding_mask, positions=positions, cache=kv)
        y, attn_info = split_output(out)
        info.add("attn", attn_info)
        x = x + y
        y, ffn_info = split_output(self.ffn(self.ffn_norm(x), padding_mask=padding_mask))
        info.add("ffn", ffn_info)
        return x + y, info


@components.register("block", "mod")
def _mod_block(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """Mixture-of-depths on every ``mod.every``-th layer, dense blocks between."""
    block = TransformerBlock(cfg, layer_idx)
    if (layer_idx + 1) % cfg.mod.every:
        return block
    return MixtureOfDepths(block, d_model=cfg.d_model, capacity=cfg.mod.capacity, weighting="sigmoid",
                           causal_scheme=cfg.mod.causal_scheme)


@components.register("block", "skip")
def _skip_block(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    """Learned per-token skipping on every ``skip.every``-th layer."""
    block = TransformerBlock(cfg, layer_idx)
    if (layer_idx + 1) % cfg.skip.every:
        return block
    return LayerSkip(block, d_model=cfg.d_model, target_rate=cfg.skip.target_rate, temperature=cfg.skip.temperature)


class RecurrentBlock(nn.Module):
    """x + SRU(norm(x)) or x + SRU++(norm(x)): one recurrent layer of d_model cells in the residual
    stream, in place of attention + FFN (SRU++ has no FFN; its recurrence carries the state).
    Same interface as TransformerBlock; no key/value cache (generation recomputes)."""

    supports_cache = False

    def __init__(self, cfg: ModelConfig, layer_idx: int, *, attention: bool):
        super().__init__()
        rc = cfg.recurrence
        self.d_model = cfg.d_model
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        proj = None
        if attention and (layer_idx + 1) % rc.attn_every == 0:
            attn_size = rc.attn_size or max(rc.attn_heads, cfg.d_model // 4)
            proj = SRUppAttention(cfg.d_model, attn_size, 3 * cfg.d_model, n_heads=rc.attn_heads, causal=True,
                                  dropout=cfg.dropout)
        self.sru = SRULayer(cfg.d_model, cfg.d_model, highway_bias=rc.highway_bias, input_proj=proj)

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                positions: torch.Tensor | None = None, cache: ModelCache | None = None):
        if positions is not None or cache is not None:
            raise ValueError("recurrent blocks run on whole sequences: no positions (MoD) and no cache")
        real = None if padding_mask is None else padding_mask.t()
        h, _ = self.sru(self.norm(x).transpose(0, 1), None, real)
        return x + h.transpose(0, 1).to(x.dtype), LayerInfo()


@components.register("block", "sru")
def _sru_block(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    return RecurrentBlock(cfg, layer_idx, attention=False)


@components.register("block", "srupp")
def _srupp_block(cfg: ModelConfig, layer_idx: int) -> nn.Module:
    return RecurrentBlock(cfg, layer_idx, attention=True)


class Transformer(nn.Module):
    """Decoder LM. ``forward(tokens [batch, seq] int64) -> ModelOutput`` (logits [batch, seq, vocab])."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            components.build("block", cfg.block, cfg, i) for i in range(cfg.n_layers)
        )
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight  # tied
        self._refuse_look_ahead()
        self.reset_parameters()

    def _refuse_look_ahead(self) -> None:
        """A decoder must not contain a layer whose routing reads future tokens."""
        for name, module in self.named_modules():
            if getattr(module, "causal", True) is False:
                raise ValueError(
                    f"{name} ({type(module).__name__}) is not causal: its routing would let a token see later "
                    "tokens, and the decoder would learn to cheat. Choose a causal scheme (e.g. "
                    "expert_choice_mode: per_position)")

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        # Residual-output projections are scaled down with depth (GPT-2) so the residual stream's
        # variance does not grow with the number of layers.
        residual_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if p.dim() < 2:
                continue
            is_residual_out = name.endswith(("out.weight", "down.weight", "experts.down"))
            nn.init.normal_(p, mean=0.0, std=residual_std if is_residual_out else std)
        for module in self.modules():
            if isinstance(module, (BinaryGate, SRULayer)):
                # BinaryGate: its bias makes tokens start by running the block. SRULayer: the paper's
                # initialisation of W, the recurrent weights v and the highway bias.
                module.reset_parameters()

    def forward(self, tokens: torch.Tensor, cache: ModelCache | None = None) -> ModelOutput:
        """tokens: [batch, seq] int64. cache: continue from the tokens a ModelCache has seen
        (incremental decoding, inference mode only); it is advanced by seq."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        end = tokens.shape[1] + (cache.offset if cache is not None else 0)
        if end > self.cfg.seq_len:
            raise ValueError(f"sequence length {end} exceeds model seq_len {self.cfg.seq_len}")
        if cache is not None and not self.supports_cache:
            raise ValueError("this model has a layer that cannot decode incrementally; call without a cache")
        aux = AuxCollector()
        x = self.drop(self.embed(tokens))
        for i, block in enumerate(self.blocks):
            x, info = split_output(block(x, cache=cache))
            aux.add(f"layer{i}", info)
        if cache is not None:
            cache.offset = end
        logits = self.lm_head(self.norm(x))
        return ModelOutput(logits=logits, aux_losses=dict(aux.losses), metrics=aux.metrics)

    @property
    def supports_cache(self) -> bool:
        """True when every block can decode incrementally with a key/value cache."""
        return all(getattr(getattr(b, "block", b), "supports_cache", False) for b in self.blocks)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample continuations. prompt: [batch, t] int64 -> [batch, t + max_new_tokens].

        With a key/value cache (every block supports it, and the text fits in seq_len) each step
        processes one new token; otherwise each step recomputes the context, cropped to seq_len.
        In inference mode both give the same logits (tested).
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        out = prompt
        use_cache = self.supports_cache and prompt.shape[1] + max_new_tokens <= self.cfg.seq_len
        cache = ModelCache() if use_cache else None
        for step in range(max_new_tokens):
            if cache is not None:
                logits = self(out if step == 0 else out[:, -1:], cache=cache).logits[:, -1, :].float()
            else:
                logits = self(out[:, -self.cfg.seq_len :]).logits[:, -1, :].float()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
            out = torch.cat([out, nxt], dim=1)
        return out
