"""A configurable decoder-only Transformer LM.

Pre-norm blocks (RMSNorm), rotary positions, SDPA causal attention, SwiGLU or GELU FFN, tied input
and output embeddings. Each block is a technique the config names (``model.block``, and inside it
``model.attention`` and ``model.ffn``), built by the registry: this module names no technique.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch import nn

from condcomp import registry
from condcomp.config import ModelConfig
from condcomp.layers.info import LayerInfo
from condcomp.layers.kv_cache import ModelCache
from condcomp.layers.norm import RMSNorm
from condcomp.layers.traits import look_ahead_modules
from condcomp.recompute import run_checkpointed


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


class Transformer(nn.Module):
    """Decoder LM. ``forward(tokens [batch, seq] int64) -> ModelOutput`` (logits [batch, seq, vocab])."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            registry.build("block", cfg.block, model=cfg, layer_idx=i) for i in range(cfg.n_layers)
        )
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self._refuse_look_ahead()
        self.reset_parameters()
        # Activation checkpointing (a trainer's choice, not part of the model): in training, keep only
        # each block's input and recompute the block in backward.
        self.checkpoint_blocks = False

    def _refuse_look_ahead(self) -> None:
        """A decoder must not contain a layer whose routing reads future tokens at inference."""
        for name, module in look_ahead_modules(self):
            if name:
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
            if getattr(module, "owns_init", False):
                # Layers with an initialisation of their own (a gate's run bias, SRU's paper init).
                module.reset_parameters()

    def forward(self, tokens: torch.Tensor, cache: ModelCache | None = None,
                padding_mask: torch.Tensor | None = None, last_only: bool = False) -> ModelOutput:
        """tokens: [batch, seq] int64. cache: continue from the tokens a ModelCache has seen
        (incremental decoding, inference mode only); it is advanced by seq. padding_mask: [batch, seq]
        bool, True = real token; padded tokens are never attended to or routed (their logits are junk).
        last_only: logits of the last position only, [batch, 1, vocab] (generation needs no more)."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be [batch, seq], got shape {tuple(tokens.shape)}")
        end = tokens.shape[1] + (cache.offset if cache is not None else 0)
        if end > self.cfg.seq_len:
            raise ValueError(f"sequence length {end} exceeds model seq_len {self.cfg.seq_len}")
        if cache is not None and not self.supports_cache:
            raise ValueError("this model has a layer that cannot decode incrementally; call without a cache")
        aux = AuxCollector()
        x = self.drop(self.embed(tokens))
        recompute = self.checkpoint_blocks and self.training and cache is None and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if recompute:
                x, info = run_checkpointed(block, x, padding_mask=padding_mask, cache=None)
            else:
                x, info = block(x, padding_mask=padding_mask, cache=cache)
            aux.add(f"layer{i}", info)
        if cache is not None:
            cache.offset = end
        if last_only:
            x = x[:, -1:]
        logits = self.lm_head(self.norm(x))
        return ModelOutput(logits=logits, aux_losses=dict(aux.losses), metrics=aux.metrics)

    @property
    def supports_cache(self) -> bool:
        """True when every block can decode incrementally with a key/value cache."""
        return all(getattr(b, "supports_cache", False) for b in self.blocks)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None,
                 prefilled: tuple[ModelCache, torch.Tensor] | None = None) -> torch.Tensor:
        """Sample continuations. prompt: [batch, t] int64 -> [batch, t + max_new_tokens].

        With a key/value cache (every block supports it, and the text fits in seq_len) each step
        processes one new token; otherwise each step recomputes the context, cropped to seq_len.
        In inference mode both give the same logits (tested).

        prefilled: (cache, logits [batch, vocab]) of a pass over the whole prompt that was already
        made, by this model or one computing the same keys and values (a pruned model's masked
        twin): decoding starts from them instead of reading the prompt again.
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        out = prompt
        use_cache = self.supports_cache and prompt.shape[1] + max_new_tokens <= self.cfg.seq_len
        cache = ModelCache() if use_cache else None
        if prefilled is not None:
            if not use_cache or prefilled[0].offset != prompt.shape[1]:
                raise ValueError("prefilled needs a model that decodes with a cache, room in seq_len, and a cache that "
                                 f"has read the whole prompt ({prompt.shape[1]} tokens, not {prefilled[0].offset})")
            cache = prefilled[0]
        for step in range(max_new_tokens):
            if step == 0 and prefilled is not None:
                logits = prefilled[1].float()
            elif cache is not None:
                logits = self(out[:, cache.offset :], cache=cache, last_only=True).logits[:, -1, :].float()
            else:
                logits = self(out[:, -self.cfg.seq_len :], last_only=True).logits[:, -1, :].float()
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
