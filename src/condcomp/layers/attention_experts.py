"""A mixture of attention experts with soft routing (BAM, Zhang et al., 2024).

Every token runs every attention expert and mixes their outputs with its own softmax gates:

    y(x) = sum_e g_e(x) O_e Attn(Q_e x, K_e x, V_e x),     g(x) = softmax(W_r x)

Since the gates are per token and each expert is ordinary causal attention, the mixture is causal and
decodes with a key/value cache. All experts run, so its compute is num_experts attentions (counted as
such by the FLOP counter), plus the router.

One fused attention does the work: the experts' query heads are the heads of a single attention with
num_experts * n_heads query heads, and the gates weight each head's output before one output
projection (sum_e g_e O_e y_e = [g_1 y_1 | ... | g_E y_E] [O_1 | ... | O_E]^T). With separate key/value
projections, heads are ordered expert-major, so grouped-query attention pairs expert e's query heads
with expert e's key/value heads; with shared key/value projections (BAM's cheaper variant: keys and
values computed once, a cache num_experts times smaller) heads are ordered head-major, so each shared
key/value head serves query head j of every expert.
"""

from __future__ import annotations

import torch
from torch import nn

from condcomp.layers.attention import Attention
from condcomp.layers.info import LayerInfo


class AttentionExperts(Attention):
    """Soft mixture of ``num_experts`` attention experts. x: [b, t, d] -> (y [b, t, d], LayerInfo with
    metric ``gates``: the mean gate of each expert over the batch's tokens, [num_experts]).

    Args:
        d_model, n_heads, n_kv_heads, head_dim, qkv_bias, rope, rope_base, dropout, max_len: as
            ``Attention``, for one expert.
        num_experts: attention experts E. shared_kv: one key/value projection for all experts.
    Parameters: the fused ``qkv`` and ``out`` (use ``expert_weights`` / ``set_expert`` to read or
    write one expert's q/k/v/o in ``Attention``'s layout) and ``router`` [E, d_model].
    """

    causal = True
    causal_in_training = True
    selects_tokens = False

    def __init__(self, *, d_model: int, n_heads: int, num_experts: int, max_len: int, shared_kv: bool = False,
                 rope_base: float = 10000.0, dropout: float = 0.0, n_kv_heads: int | None = None,
                 head_dim: int | None = None, qkv_bias: bool = False, rope: dict | None = None):
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        n_kv_heads = n_kv_heads or n_heads
        if head_dim is None:
            if d_model % n_heads:
                raise ValueError(f"d_model={d_model} must be divisible by n_heads={n_heads} (or pass head_dim)")
            head_dim = d_model // n_heads
        super().__init__(d_model=d_model, n_heads=num_experts * n_heads, max_len=max_len, causal=True,
                         rope_base=rope_base, dropout=dropout,
                         n_kv_heads=n_kv_heads if shared_kv else num_experts * n_kv_heads, head_dim=head_dim,
                         qkv_bias=qkv_bias, out_bias=False, rope=rope)
        self.num_experts, self.shared_kv = num_experts, shared_kv
        self.expert_heads, self.expert_kv_heads = n_heads, n_kv_heads
        self.router = nn.Linear(d_model, num_experts, bias=False)

    # ---- layout: which fused heads belong to expert e -------------------------------------------
    def query_heads(self, e: int) -> list[int]:
        """Indices of expert e's query heads among the fused heads (its head j is entry j)."""
        E, h = self.num_experts, self.expert_heads
        return [j * E + e for j in range(h)] if self.shared_kv else [e * h + j for j in range(h)]

    def kv_heads(self, e: int) -> list[int]:
        """Indices of expert e's key/value heads (all of them when shared)."""
        kv = self.expert_kv_heads
        return list(range(kv)) if self.shared_kv else [e * kv + j for j in range(kv)]

    def _rows(self, heads: list[int], offset: int) -> torch.Tensor:
        hd = self.head_dim
        return torch.cat([torch.arange(offset + i * hd, offset + (i + 1) * hd) for i in heads])

    def _index(self, e: int) -> dict[str, torch.Tensor]:
        """Row indices of expert e's q, k, v in ``qkv`` and its columns in ``out``."""
        q_width = self.n_heads * self.head_dim
        kv_width = self.n_kv_heads * self.head_dim
        return {"q": self._rows(self.query_heads(e), 0), "k": self._rows(self.kv_heads(e), q_width),
                "v": self._rows(self.kv_heads(e), q_width + kv_width), "o": self._rows(self.query_heads(e), 0)}

    def expert_weights(self, e: int) -> dict[str, torch.Tensor]:
        """Expert e as one ``Attention`` would hold it: q [h hd, d], k and v [kv hd, d], o [d, h hd],
        and the q/k/v biases when the layer has them (copies)."""
        idx = self._index(e)
        w = self.qkv.weight
        out = {"q": w[idx["q"]].clone(), "k": w[idx["k"]].clone(), "v": w[idx["v"]].clone(),
               "o": self.out.weight[:, idx["o"]].clone()}
        if self.qkv.bias is not None:
            for name in ("q", "k", "v"):
                out[f"{name}_bias"] = self.qkv.bias[idx[name]].clone()
        return out

    @torch.no_grad()
    def set_expert(self, e: int, weights: dict[str, torch.Tensor]) -> None:
        """Write expert e's q/k/v/o (the layout ``expert_weights`` returns). With shared key/value
        projections, k and v (if given) set the shared ones."""
        idx = self._index(e)
        for name in ("q", "k", "v"):
            if name in weights:
                self.qkv.weight[idx[name]] = weights[name].to(self.qkv.weight.dtype)
            if f"{name}_bias" in weights and self.qkv.bias is not None:
                self.qkv.bias[idx[name]] = weights[f"{name}_bias"].to(self.qkv.bias.dtype)
        if "o" in weights:
            self.out.weight[:, idx["o"]] = weights["o"].to(self.out.weight.dtype)

    # ---- routing ---------------------------------------------------------------------------------
    def head_weights(self, x: torch.Tensor) -> tuple[torch.Tensor, LayerInfo]:
        logits = self.router(x)
        # At least float32: a bf16 softmax would make the gates sum visibly off 1.
        gates = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # [b, t, E]
        if self.shared_kv:  # head-major: fused head j * E + e is expert e's head j
            per_head = gates.repeat(1, 1, self.expert_heads)
        else:  # expert-major: fused head e * h + j
            per_head = gates.repeat_interleave(self.expert_heads, dim=-1)
        info = LayerInfo(metrics={"gates": gates.detach().reshape(-1, self.num_experts).mean(0)})
        return per_head, info
