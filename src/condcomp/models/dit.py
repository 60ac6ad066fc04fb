"""A diffusion transformer (DiT; Peebles & Xie, 2023) whose feed-forward is any registered FFN
technique: dense, token-choice MoE, or expert-choice MoE routed per image (EC-DiT; Sun, Lei et al.,
2024). It predicts the rectified-flow velocity (``condcomp.models.flow``).

    image [b, C, H, W] -> patches [b, N, C p^2] -> linear -> + 2-D sin-cos positions -> L blocks
    -> adaLN final layer -> patches -> velocity [b, C, H, W]

Each block is adaLN-Zero: the condition c = embed(t) + embed(class) gives per-block shift, scale
and gate for attention and FFN, with the modulation's last linear initialised to zero so every
block starts as the identity. Attention is bidirectional over the patches (an image is seen whole,
so expert choice may rank all of an image's patches: ``moe.expert_choice_mode: per_sequence``).
Class index ``num_classes`` is the null label that classifier-free guidance drops to.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from condcomp import registry
from condcomp.dit_config import DiTConfig


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of t in [0, 1] (scaled by 1000, as DDPM step numbers): [b] -> [b, dim]."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_positions_2d(side: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding of a side x side grid: [side^2, dim] (half the channels
    encode the row, half the column)."""
    def one_axis(pos: torch.Tensor, d: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.double()[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.cat([one_axis(rows.flatten(), dim // 2), one_axis(cols.flatten(), dim // 2)], dim=1).float()


# Up to this many patches attention runs on SDPA's math path: on CPU the fused flash kernel's backward
# is about 7x slower at 16 tokens (6.9 vs 1.0 ms for [64, 4, 16, 32] in bf16), and the [N, N] scores
# the math path materialises are small for an image's patch count.
MATH_ATTENTION_MAX_PATCHES = 256


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """adaLN-Zero block: x [b, N, d], c [b, d] -> (x [b, N, d], LayerInfo of its FFN)."""

    def __init__(self, cfg: DiTConfig, layer_idx: int):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.norm1 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.ffn = registry.build("ffn", cfg.ffn, model=cfg, layer_idx=layer_idx)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))

    def forward(self, x: torch.Tensor, c: torch.Tensor):
        b, n, d = x.shape
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c).chunk(6, dim=-1)
        q, k, v = self.qkv(_modulate(self.norm1(x), shift1, scale1)).view(b, n, 3, self.n_heads, -1).unbind(2)
        short = n <= MATH_ATTENTION_MAX_PATCHES and x.device.type == "cpu"
        with sdpa_kernel(SDPBackend.MATH) if short else contextlib.nullcontext():
            attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + gate1[:, None] * self.proj(attn.transpose(1, 2).reshape(b, n, d))
        y, info = self.ffn(_modulate(self.norm2(x), shift2, scale2))
        return x + gate2[:, None] * y, info


class DiT(nn.Module):
    """Class-conditional diffusion transformer predicting the rectified-flow velocity.

    forward(x [b, C, H, W], t [b] in [0, 1], labels [b] int64 (num_classes = null)) ->
    (velocity [b, C, H, W], list of each block's FFN LayerInfo).
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        d, p, side = cfg.d_model, cfg.patch, cfg.image_size // cfg.patch
        self.patch_embed = nn.Linear(cfg.channels * p * p, d)
        self.register_buffer("positions", sincos_positions_2d(side, d), persistent=False)
        self.time_embed = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))
        self.class_embed = nn.Embedding(cfg.num_classes + 1, d)
        self.blocks = nn.ModuleList(DiTBlock(cfg, i) for i in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(d, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.final = nn.Linear(d, cfg.channels * p * p)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """DiT's init: xavier linears, N(0, 0.02) embeddings, zero modulations and output (adaLN-Zero:
        every block starts as the identity and the model predicts zero velocity)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for name, param in self.named_parameters():
            if param.dim() == 3:  # grouped experts [E, in, out]: each expert as the dense linear it replaces
                for expert in param.data:
                    nn.init.xavier_uniform_(expert)
        nn.init.normal_(self.class_embed.weight, std=0.02)
        for lin in [blk.modulation[-1] for blk in self.blocks] + [self.final_modulation[-1], self.final]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        for module in self.modules():  # techniques that own their init (routers) re-apply it
            if module is not self and getattr(module, "owns_init", False):
                module.reset_parameters()

    def patchify(self, x: torch.Tensor) -> torch.Tensor:
        """[b, C, H, W] -> [b, N, C p^2], patches row-major."""
        b, c, h, w = x.shape
        p = self.cfg.patch
        return x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[b, N, C p^2] -> [b, C, H, W]."""
        b = x.shape[0]
        p, c, side = self.cfg.patch, self.cfg.channels, self.cfg.image_size // self.cfg.patch
        return x.view(b, side, side, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, c, side * p, side * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor):
        cfg = self.cfg
        if x.shape[1:] != (cfg.channels, cfg.image_size, cfg.image_size):
            raise ValueError(f"expected images [b, {cfg.channels}, {cfg.image_size}, {cfg.image_size}], got {tuple(x.shape)}")
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > cfg.num_classes):
            raise ValueError(f"class labels must be in 0..{cfg.num_classes - 1} (or {cfg.num_classes}, the null "
                             f"label), got {labels.min().item()}..{labels.max().item()}")
        h = self.patch_embed(self.patchify(x)) + self.positions.to(x.dtype)
        c = self.time_embed(timestep_embedding(t, cfg.d_model).to(h.dtype)) + self.class_embed(labels)
        infos = []
        for block in self.blocks:
            h, info = block(h, c)
            infos.append(info)
        shift, scale = self.final_modulation(c).chunk(2, dim=-1)
        return self.unpatchify(self.final(_modulate(self.final_norm(h), shift, scale))), infos
