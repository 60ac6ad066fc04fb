"""Every expert of a bank on its contiguous run of rows, forward and backward in one autograd node.

The plain way — one autograd subgraph per expert (``Experts.forward`` on ``xs.split(sizes)``, the
reference twin) — costs more than its GEMMs: the outputs are concatenated, and the backward
concatenates again for the input gradient, stacks the per-expert weight gradients of ``unbind``,
concatenates SwiGLU's gate and up gradients per expert, and under autocast casts every expert's
weights separately. In bf16 those copies took about 9% of a top-2 layer's forward+backward here.

``ExpertLoop`` writes each expert's GEMMs straight into preallocated rows of one output, input
gradient and weight-gradient bank (``torch.mm(..., out=)``), casts the bank once, and keeps only the
input and the pre-activation for the backward (the activation is recomputed there from the
pre-activation): fewer copies and less saved memory than the autograd loop, with the same result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def activate(h: torch.Tensor, activation: str) -> torch.Tensor:
    """h [..., width] -> [..., d_ff]: SwiGLU (width 2 d_ff: silu(gate) * up) or GELU (width d_ff)."""
    if activation == "swiglu":
        gate, up_part = h.chunk(2, dim=-1)
        return F.silu(gate) * up_part
    return F.gelu(h)


def activate_for_backward(h: torch.Tensor, activation: str) -> tuple[torch.Tensor, tuple]:
    """activate(h) and what ``activation_backward`` reuses of it (SwiGLU: silu(gate)), so the backward
    recomputes each element-wise function once."""
    if activation == "swiglu":
        gate, up_part = h.chunk(2, dim=-1)
        silu_gate = F.silu(gate)
        return silu_gate * up_part, (silu_gate,)
    return F.gelu(h), ()


def activation_backward(grad: torch.Tensor, h: torch.Tensor, activation: str, reused: tuple,
                        out: torch.Tensor) -> torch.Tensor:
    """The gradient with respect to h [m, width] of activate(h) given grad [m, d_ff], written into out [m, width]."""
    if activation == "swiglu":
        d_ff = grad.shape[-1]
        gate, up_part = h[:, :d_ff], h[:, d_ff:]
        (silu_gate,) = reused
        torch.mul(grad, silu_gate, out=out[:, d_ff:])
        torch.ops.aten.silu_backward.grad_input(grad * up_part, gate, grad_input=out[:, :d_ff])
    else:
        torch.ops.aten.gelu_backward.grad_input(grad, h, grad_input=out)
    return out


class ExpertLoop(torch.autograd.Function):
    """ys = concat over experts g of activate(xs_g @ up[g]) @ down[g], xs_g the g-th run of sizes[g] rows.

    xs [a, d_model] rows sorted by expert; up [e, d_model, width]; down [e, d_ff, d_model];
    sizes: e ints summing to a; dtype: the compute dtype (autocast's, or xs's). Returns [a, d_model]
    in dtype. Saved for the backward: xs and the pre-activations [a, width] in dtype, and the bank
    in dtype (a cast copy under autocast, as a matmul under autocast keeps).
    """

    @staticmethod
    def forward(ctx, xs, up, down, sizes: tuple[int, ...], activation: str, dtype: torch.dtype):
        with torch.autocast(xs.device.type, enabled=False):
            xc, upc, downc = xs.to(dtype), up.to(dtype), down.to(dtype)
            h = xc.new_empty(xs.shape[0], up.shape[2])
            ys = xc.new_empty(xs.shape[0], down.shape[2])
            start = 0
            for g, m in enumerate(sizes):
                if m:
                    rows = slice(start, start + m)
                    torch.mm(xc[rows], upc[g], out=h[rows])
                    torch.mm(activate(h[rows], activation), downc[g], out=ys[rows])
                    start += m
        ctx.save_for_backward(xc, upc, downc, h)
        ctx.sizes, ctx.activation = sizes, activation
        ctx.dtypes = (xs.dtype, up.dtype, down.dtype)
        return ys

    @staticmethod
    def backward(ctx, grad_ys):
        xc, upc, downc, h = ctx.saved_tensors
        need_x, need_up, need_down = ctx.needs_input_grad[:3]
        with torch.autocast(grad_ys.device.type, enabled=False):
            gy = grad_ys.to(xc.dtype)
            grad_x = torch.empty_like(xc) if need_x else None
            grad_up = upc.new_empty(upc.shape) if need_up else None
            grad_down = downc.new_empty(downc.shape) if need_down else None
            grad_h = h.new_empty(max(ctx.sizes, default=0), h.shape[1])  # reused by every expert
            start = 0
            for g, m in enumerate(ctx.sizes):
                if not m:
                    for bank in (grad_up, grad_down):
                        if bank is not None:
                            bank[g].zero_()
                    continue
                rows = slice(start, start + m)
                h_g = h[rows]
                act, reused = activate_for_backward(h_g, ctx.activation)
                if need_down:
                    torch.mm(act.t(), gy[rows], out=grad_down[g])
                del act
                grad_act = gy[rows] @ downc[g].t()
                gh = activation_backward(grad_act, h_g, ctx.activation, reused, grad_h[:m])
                if need_up:
                    torch.mm(xc[rows].t(), gh, out=grad_up[g])
                if need_x:
                    torch.mm(gh, upc[g].t(), out=grad_x[rows])
                start += m
        x_dtype, up_dtype, down_dtype = ctx.dtypes
        return (grad_x.to(x_dtype) if need_x else None, grad_up.to(up_dtype) if need_up else None,
                grad_down.to(down_dtype) if need_down else None, None, None, None)


def expert_loop(xs: torch.Tensor, up: torch.Tensor, down: torch.Tensor, sizes: list[int],
                activation: str) -> torch.Tensor:
    """``ExpertLoop`` at autocast's dtype where autocast is on (as a matmul would run), else xs's."""
    device = xs.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else xs.dtype
    return ExpertLoop.apply(xs, up, down, tuple(sizes), activation, dtype)
