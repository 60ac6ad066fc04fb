"""SRU's element-wise recurrence over time, with a fused CPU path and a plain reference twin.

For every time step t (all arguments [T, batch, d] unless said otherwise):

    f_t = sigmoid(uf_t + v_f * c_{t-1} + b_f)          forget gate
    r_t = sigmoid(ur_t + v_r * c_{t-1} + b_r)          reset (highway) gate
    c_t = f_t * c_{t-1} + (1 - f_t) * ux_t             cell
    h_t = r_t * c_t + (1 - r_t) * xs_t                 output (xs: the highway input, already scaled)

Only c depends on the previous step, and only through f, so the fast path loops over time doing
three element-wise kernels per step (addcmul, sigmoid, lerp) and computes r and h for all steps at
once afterwards. Its backward is written by hand: every gate is recomputed from the saved cells in
one vectorised pass, and the only sequential part left is the linear carry of dL/dc, two kernels per
step. No autograd graph is recorded per step, which is what makes a per-step loop slow.

Padding (real [T, batch] or [T, batch, d] bool, False = padded) leaves the cell unchanged and outputs 0, so a
sequence's final cell is the one after its last real step. The fast path does this by forcing
f = 1 and ux = 0 on padded steps (c = lerp(0, c, 1) = c exactly).
"""

from __future__ import annotations

import torch


class _SRURecurrence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, ux, uf, ur, xs, v_f, v_r, b_f, b_r, c0, real):
        pf = uf + b_f
        if real is not None:
            pad = ~real
            pf = pf.masked_fill(pad, float("inf"))
            ux = ux.masked_fill(pad, 0.0)
        cells = torch.empty_like(ux)
        c = c0
        for t in range(ux.shape[0]):
            f = torch.addcmul(pf[t], v_f, c).sigmoid_()
            c = torch.lerp(ux[t], c, f, out=cells[t])  # ux + f * (c - ux)
        prev = torch.cat([c0[None], cells[:-1]])
        r = torch.addcmul(ur + b_r, v_r, prev).sigmoid_()
        h = torch.lerp(xs, cells, r)
        if real is not None:
            h = h.masked_fill(pad, 0.0)
        ctx.save_for_backward(ux, pf, ur, xs, v_f, v_r, b_r, c0, cells, real)
        return h, cells[-1].clone()

    @staticmethod
    def backward(ctx, grad_h, grad_c_last):
        ux, pf, ur, xs, v_f, v_r, b_r, c0, cells, real = ctx.saved_tensors
        prev = torch.cat([c0[None], cells[:-1]])
        f = torch.addcmul(pf, v_f, prev).sigmoid_()
        r = torch.addcmul(ur + b_r, v_r, prev).sigmoid_()
        gh = grad_h if real is None else grad_h.masked_fill(~real, 0.0)
        d_rpre = gh * (cells - xs) * r * (1 - r)
        d_xs = gh * (1 - r)
        gate_slope = (prev - ux) * f * (1 - f)          # d c_t / d (forget pre-activation)
        through = torch.addcmul(f, gate_slope, v_f)     # d c_t / d c_{t-1}
        from_h = gh * r                                 # dL/dc_t from h_t
        from_r = d_rpre * v_r                           # dL/dc_{t-1} through r_t
        d_cells = torch.empty_like(cells)
        carry = grad_c_last if grad_c_last is not None else torch.zeros_like(c0)
        for t in range(cells.shape[0] - 1, -1, -1):
            dc = torch.add(carry, from_h[t], out=d_cells[t])
            carry = torch.addcmul(from_r[t], dc, through[t])
        d_fpre = d_cells * gate_slope
        d_ux = d_cells * (1 - f)
        return (d_ux, d_fpre, d_rpre, d_xs, (d_fpre * prev).sum((0, 1)), (d_rpre * prev).sum((0, 1)),
                d_fpre.sum((0, 1)), d_rpre.sum((0, 1)), carry, None)


def sru_recurrence(ux, uf, ur, xs, v_f, v_r, b_f, b_r, c0, real=None, *, fast: bool = True):
    """Run the recurrence. ux, uf, ur, xs: [T, batch, d]; v_f, v_r, b_f, b_r: [d]; c0: [batch, d];
    real: [T, batch] or [T, batch, d] bool (False = padded) or None. Returns (h [T, batch, d], c_last [batch, d]), in float32 or float64
    (the recurrence never runs in bf16: errors would compound over time steps)."""
    dtype = torch.float64 if ux.dtype == torch.float64 else torch.float32
    args = [a.to(dtype) for a in (ux, uf, ur, xs, v_f, v_r, b_f, b_r, c0)]
    if real is not None:
        real = real.to(torch.bool)
        if real.dim() == 2:
            real = real[..., None]
    with torch.autocast(ux.device.type, enabled=False):
        if fast:
            return _SRURecurrence.apply(*args, real)
        return sru_recurrence_reference(*args, real)


def sru_recurrence_reference(ux, uf, ur, xs, v_f, v_r, b_f, b_r, c0, real=None):
    """The same recurrence step by step, differentiated by autograd (the reference twin)."""
    c, outputs = c0, []
    for t in range(ux.shape[0]):
        f = torch.sigmoid(uf[t] + v_f * c + b_f)
        r = torch.sigmoid(ur[t] + v_r * c + b_r)
        c_new = f * c + (1 - f) * ux[t]
        h = r * c_new + (1 - r) * xs[t]
        if real is not None:
            keep = real[t]
            c_new = torch.where(keep, c_new, c)
            h = torch.where(keep, h, torch.zeros_like(h))
        c = c_new
        outputs.append(h)
    return torch.stack(outputs), c
