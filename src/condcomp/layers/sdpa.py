"""Scaled dot-product attention that picks the faster CPU kernel for short sequences.

PyTorch's CPU flash-attention kernel computes in fp32 blocks whatever the input dtype, so in bf16 it
is no faster than in fp32, and its backward takes about three times its forward. For short
sequences the materialized form — scores by one batched GEMM, softmax, a second GEMM — runs its
GEMMs on the bf16 units: forward+backward 2.6-3x faster at 256 tokens and 1.1-2.6x at 512; at 1024
0.7x with glibc's default allocator and 1.4x with the trainer's (docs/benchmarks.md, "Attention
kernels"). In fp32 it wins at 64 tokens under both. It keeps the [heads, q_len, k_len] probabilities
for the backward, so the limits stay where both allocators agree. ``attention`` takes that path on CPU within
``MATERIALIZED_MAX_LEN`` and without an explicit mask or dropout, and calls
``F.scaled_dot_product_attention`` otherwise. In bf16 the scores are rounded to bf16 before the
softmax, as in the plain composition under autocast; the gradients are as accurate as the flash
kernel's (tests/test_attention.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The longest query or key length at which the materialized form is faster, by dtype, for training
# (forward+backward) and for inference (forward alone); measured by benchmarks/attention_kernels.py
# (docs/benchmarks.md, "Attention kernels"). Other dtypes always take PyTorch's kernel.
MATERIALIZED_MAX_LEN = {
    torch.bfloat16: {"train": 512, "infer": 256},
    torch.float32: {"train": 64, "infer": 64},
}


def uses_materialized(q: torch.Tensor, k: torch.Tensor, attn_mask=None, dropout_p: float = 0.0,
                      backward: bool = True) -> bool:
    """Whether ``attention`` takes the materialized-scores path for these arguments (backward: whether
    a gradient will flow through it)."""
    limits = MATERIALIZED_MAX_LEN.get(q.dtype)
    if limits is None or q.device.type != "cpu" or k.dtype != q.dtype or q.dim() != 4:
        return False
    max_len = limits["train" if backward else "infer"]
    return attn_mask is None and dropout_p == 0.0 and q.shape[-2] <= max_len and k.shape[-2] <= max_len


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
              enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` with the same arguments and result (q [b, h, t, hd], k and v
    [b, kv_heads, s, hd] -> [b, h, t, hd]); short bf16 CPU calls run ``MaterializedAttention``."""
    gqa_ok = k.shape[1] == q.shape[1] or (enable_gqa and q.shape[1] % k.shape[1] == 0)
    backward = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if gqa_ok and uses_materialized(q, k, attn_mask, dropout_p, backward):
        return MaterializedAttention.apply(q, k, v, is_causal, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                          scale=scale, enable_gqa=enable_gqa)


def _causal_mask(t: int, s: int, groups: int, device) -> torch.Tensor:
    """True where a query may NOT look: [groups * t, s], key j > query i (top-left aligned, as PyTorch's
    ``is_causal``), repeated for the query heads that share a key/value head."""
    return torch.ones(t, s, dtype=torch.bool, device=device).triu_(1).repeat(groups, 1)


class MaterializedAttention(torch.autograd.Function):
    """softmax(q k^T * scale [+ causal mask]) v with the probabilities kept for the backward.

    q [b, h, t, hd]; k, v [b, kv, s, hd] with kv dividing h (query heads h*g .. h*g+g-1 share key/value
    head g, as ``enable_gqa``). The g query heads of a group are stacked along the rows, so each
    GEMM is one batched call over b * kv of [g t, hd] x [hd, s]; a shared key's gradient then sums
    over its query heads inside the GEMM. Saved: q, k, v and the probabilities [b kv, g t, s].
    """

    @staticmethod
    def forward(ctx, q, k, v, is_causal: bool = False, scale: float | None = None):
        b, h, t, hd = q.shape
        kv, s = k.shape[1], k.shape[2]
        g = h // kv
        scale = hd**-0.5 if scale is None else scale
        q3 = q.reshape(b * kv, g * t, hd)
        k3, v3 = k.reshape(b * kv, s, hd), v.reshape(b * kv, s, hd)
        # beta=0 ignores the (never materialised) expanded input: scores = scale * q k^T in one GEMM.
        scores = torch.baddbmm(q3.new_zeros(()).expand(b * kv, g * t, s), q3, k3.transpose(1, 2), beta=0, alpha=scale)
        if is_causal:
            scores.masked_fill_(_causal_mask(t, s, g, q.device), float("-inf"))
        probs = torch.softmax(scores, dim=-1)  # accumulates in fp32 internally
        del scores
        out = torch.bmm(probs, v3)
        ctx.save_for_backward(q3, k3, v3, probs)
        ctx.scale, ctx.shapes = scale, (q.shape, k.shape)
        return out.view(b, kv, g, t, hd).view(b, h, t, hd)

    @staticmethod
    def backward(ctx, grad_out):
        q3, k3, v3, probs = ctx.saved_tensors
        q_shape, k_shape = ctx.shapes
        go3 = grad_out.reshape(q3.shape)
        grad_v = torch.bmm(probs.transpose(1, 2), go3)
        grad_probs = torch.bmm(go3, v3.transpose(1, 2))
        # probs * (grad_probs - rowsum(grad_probs * probs)) in one fused pass.
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
        del grad_probs
        zeros_q, zeros_k = q3.new_zeros(()).expand_as(q3), k3.new_zeros(()).expand_as(k3)
        grad_q = torch.baddbmm(zeros_q, grad_scores, k3, beta=0, alpha=ctx.scale)
        grad_k = torch.baddbmm(zeros_k, grad_scores.transpose(1, 2), q3, beta=0, alpha=ctx.scale)
        return grad_q.view(q_shape), grad_k.view(k_shape), grad_v.view(k_shape), None, None
